"""The distributed optimizer beyond one step: 16-bit parameters, what a rank holds, resume across layouts.

In-process (one gloo world of 2): bf16 parameters at stage 1 accumulate micro-batch gradients in fp32 (equal,
bit for bit, to the fp32 sum of each micro-batch's bf16 gradient); 20 steps with bf16 parameters stay within 5%
of the fp32 run's loss while it halves (as bf16 autocast over fp32 parameters does); the bytes of parameters, gradients and optimizer state per local
parameter are what the design says (stage 0 fp32: 16; stage 1 at N = 2: 12 fp32, 12 bf16 = 6 + 12/N).
Solver runs (torchrun, world 2): 4 steps at (MP=2, DP=1) resumed at (MP=1, DP=2, stage 1) to step 8, and
(MP=1, DP=2, stage 1) resumed at (MP=2, DP=1, stage 0), both equal the uninterrupted (MP=1, DP=2) run within
fp32 tolerance; resume at the same layout and stage 1 is bit-exact.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llama_rlhf.models.config import ModelConfig
from llama_rlhf.models.init import init_weights
from llama_rlhf.models.pretrained import build_model
from llama_rlhf.parallel.comm import all_reduce
from llama_rlhf.parallel.cross_entropy import mean_over_tokens, vocab_parallel_cross_entropy
from llama_rlhf.training.distributed_optimizer import DistributedAdamW
from tests.distributed import assert_check, grid, run_checks
from tests.launch import torchrun

TINY = dict(model_type="llama-hf", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64)


def batch_for(step: int, ps, rows: int = 4, seq: int = 12) -> dict:
    """A fixed global batch per step (a repeating pattern the model can learn); this DP rank's rows."""
    g = torch.Generator().manual_seed(step % 3)
    ids = torch.randint(1, TINY["vocab_size"], (rows, seq), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    per = rows // ps.dp_size
    return {"input_ids": ids[ps.dp_rank * per:(ps.dp_rank + 1) * per],
            "labels": labels[ps.dp_rank * per:(ps.dp_rank + 1) * per]}


def loss_share(model, batch, ps, compute_dtype):
    with torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        logits = model(batch["input_ids"])
    per_token = vocab_parallel_cross_entropy(logits, batch["labels"], ps.mp_group)
    return mean_over_tokens(per_token, batch["labels"], ps.dpsp_group)


def make(ps, stage, param_dtype=None):
    model = build_model(ModelConfig(**TINY), ps)
    init_weights(model, 7)
    return model, DistributedAdamW(model, ps, stage=stage, lr=1e-2, param_dtype=param_dtype)


def check_bf16_gradients_accumulate_in_fp32(out_dir):
    ps = grid(1, 1)  # DP = 2
    model, opt = make(ps, 1, torch.bfloat16)
    plain = build_model(ModelConfig(**TINY), ps)
    init_weights(plain, 7)
    for p in plain.parameters():  # the same bf16 values, no optimizer attached (buffers such as RoPE stay fp32)
        p.data = p.data.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    expected = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in plain.named_parameters()}
    in_bf16 = {n: torch.zeros_like(p) for n, p in plain.named_parameters()}
    for micro in range(3):
        batch = batch_for(micro, ps)
        opt.start_micro_batch(last=False)
        loss_share(model, batch, ps, torch.bfloat16).backward()
        plain.zero_grad(set_to_none=True)
        loss_share(plain, batch, ps, torch.bfloat16).backward()
        for n, p in plain.named_parameters():
            expected[n] += p.grad.float()
            in_bf16[n] += p.grad
    differs_from_bf16_sum = False
    for n, p in model.named_parameters():
        assert p.grad is None and p.main_grad.dtype == torch.float32, n
        assert torch.equal(p.main_grad, expected[n]), f"{n}: not the fp32 sum of the micro-batches' bf16 gradients"
        differs_from_bf16_sum |= not torch.equal(p.main_grad, in_bf16[n].float())
    assert differs_from_bf16_sum, "the check cannot tell fp32 from bf16 accumulation"


def check_bf16_parameters_train_like_fp32(out_dir):
    """20 steps (lr 1e-2, the loss halves): bf16 parameters at stage 1 follow the fp32 run's loss within the bound
    bf16 autocast over fp32 parameters also keeps: mean relative deviation over the steps <= 3%, and <= 10% at
    any step (the trajectory is chaotic at this learning rate: a single step has been seen 7% off, with the
    mean at 1.3%)."""
    ps = grid(1, 1)
    curves = {}
    for label, stage, param_dtype, compute in (("fp32", 0, None, torch.float32),
                                               ("bf16 autocast, fp32 parameters", 0, None, torch.bfloat16),
                                               ("bf16 parameters, stage 1", 1, torch.bfloat16, torch.bfloat16)):
        model, opt = make(ps, stage, param_dtype)
        curve = []
        for step in range(20):
            opt.start_micro_batch(last=True)
            loss = loss_share(model, batch_for(step, ps), ps, compute)
            loss.backward()
            opt.finish_gradients()
            curve.append(all_reduce(loss.detach(), ps.dpsp_group).item())
            _, skipped = opt.step(1.0)
            assert not skipped, f"{label}: step {step} skipped"
        curves[label] = curve
    fp32 = curves["fp32"]
    assert fp32[-1] < 0.5 * fp32[0], f"the fp32 loss did not fall: {fp32}"
    deviation = {label: [abs(a - b) / a for a, b in zip(fp32, curve)] for label, curve in curves.items()}
    worst = {label: max(d) for label, d in deviation.items()}
    mean = {label: sum(d) / len(d) for label, d in deviation.items()}
    for label in curves:
        assert mean[label] <= 0.03 and worst[label] <= 0.10, \
            f"{label} drifts from fp32 by {mean[label]:.3f} on average, {worst[label]:.3f} at worst (relative loss): " \
            f"{fp32} vs {curves[label]}"
    if ps.rank == 0:
        with open(os.path.join(out_dir, "bf16_curve.json"), "w") as f:
            json.dump({"curves": curves, "worst_relative_to_fp32": worst, "mean_relative_to_fp32": mean}, f)


def held_bytes(model, opt) -> float:
    """Bytes of parameters, gradient buckets, fp32 masters and AdamW moments per local trainable parameter."""
    held = opt.memory_breakdown(model)
    return sum(held[k] for k in ("parameters", "gradients", "masters", "moments")) / held["trainable_parameters"]


def check_bytes_per_parameter(out_dir):
    ps = grid(1, 1)  # N = DP x SP = 2
    measured = {}
    for label, stage, param_dtype, expected in (("stage 0 fp32", 0, None, 16.0), ("stage 1 fp32", 1, None, 12.0),
                                                ("stage 1 bf16", 1, torch.bfloat16, 6 + 12 / 2)):
        model, opt = make(ps, stage, param_dtype)
        opt.start_micro_batch(last=True)
        loss_share(model, batch_for(0, ps), ps, torch.float32 if param_dtype is None else param_dtype).backward()
        opt.step(1.0)  # creates the moments
        measured[label] = held_bytes(model, opt)
        assert abs(measured[label] - expected) <= 0.02 * expected, f"{label}: {measured[label]:.2f} B/param, " \
                                                                   f"expected {expected}"
    if ps.rank == 0:
        with open(os.path.join(out_dir, "bytes.json"), "w") as f:
            json.dump(measured, f)


CHECKS = [check_bf16_gradients_accumulate_in_fp32, check_bf16_parameters_train_like_fp32, check_bytes_per_parameter]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("zero"))
    return run_checks(2, CHECKS, out_dir), out_dir


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_distributed_optimizer(report, name):
    result, out_dir = report
    assert_check(result, name)
    measured = {"check_bf16_parameters_train_like_fp32": "bf16_curve.json", "check_bytes_per_parameter": "bytes.json"}
    if name in measured:  # pytest -s shows the figures
        print(name, open(os.path.join(out_dir, measured[name])).read())


# -- resume across layouts (solver runs) ------------------------------------------------------------------------

def train_args(ckpt, data, save_dir, mp, batch, steps, *extra):
    return ["--ckpt_dir", ckpt, "--train_file", data, "--save_dir", save_dir, "--use_chat_template", "true",
            "--max_seq_len", "96", "--max_batch_size", str(batch), "--lr", "3e-3", "--dtype", "float32",
            "--lr_scheduler", "constant", "--model_parallel_size", str(mp), "--max_steps", str(steps),
            "--save_steps", "4", "--epochs", "2", *extra]


def run_train(*args):
    proc = torchrun("solver_train.py", list(args), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f)}


def resume_copy(src_ckpt, dst_dir):
    os.makedirs(dst_dir)
    shutil.copytree(src_ckpt, os.path.join(dst_dir, os.path.basename(src_ckpt)))
    return dst_dir


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    from tests.hf_reference import write_tiny_chat_model
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat_zero")), smollm2_dir)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from tests.launch import ROOT
    with open(os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")) as f:
        lines = f.readlines()[:32]
    path = tmp_path_factory.mktemp("zero_data") / "train.jsonl"
    path.write_text("".join(lines))
    return str(path)


def test_resume_across_layouts_and_stages(tiny_model, small_data, tmp_path):
    # the uninterrupted reference: MP=1, DP=2 (stage 1 by default), 8 steps, checkpoint at 4
    a = str(tmp_path / "a")
    proc = run_train(*train_args(tiny_model, small_data, a, 1, 2, 8))
    assert "zero stage 1" in proc.stdout and "peak" in proc.stdout
    ref = metrics(a)
    assert all(ref[s]["peak_memory_mb"] > 0 for s in ref)
    # MP=2, DP=1 (stage 0) for 4 steps, resumed at MP=1, DP=2, stage 1
    c = str(tmp_path / "c")
    run_train(*train_args(tiny_model, small_data, c, 2, 4, 4))
    b = resume_copy(os.path.join(c, "checkpoint-4"), str(tmp_path / "b"))
    run_train(*train_args(tiny_model, small_data, b, 1, 2, 8, "--resume", "true", "--zero_stage", "1"))
    # MP=1, DP=2, stage 1 resumed at MP=2, DP=1, stage 0
    d = resume_copy(os.path.join(a, "checkpoint-4"), str(tmp_path / "d"))
    run_train(*train_args(tiny_model, small_data, d, 2, 4, 8, "--resume", "true", "--zero_stage", "0"))
    # the same layout and stage 1: bit-exact
    e = resume_copy(os.path.join(a, "checkpoint-4"), str(tmp_path / "e"))
    run_train(*train_args(tiny_model, small_data, e, 1, 2, 8, "--resume", "true"))

    final = load_file(os.path.join(a, "checkpoint-8", "model.safetensors"))
    seen_figures = {}
    for label, run_dir, tol in (("(2,1)->(1,2) stage 1", b, 2e-5), ("(1,2) stage 1->(2,1) stage 0", d, 2e-5),
                                ("same layout", e, 0.0)):
        seen = metrics(run_dir)
        assert sorted(seen) == [5, 6, 7, 8], f"{label}: steps {sorted(seen)}"
        for step in seen:
            a_loss, loss = ref[step]["loss"], seen[step]["loss"]
            assert abs(loss - a_loss) <= tol * abs(a_loss), f"{label}: step {step} loss {loss} vs {a_loss}"
        weights = load_file(os.path.join(run_dir, "checkpoint-8", "model.safetensors"))
        worst = max((weights[k] - final[k]).abs().max().item() for k in final)
        assert worst <= 50 * tol, f"{label}: final weights differ by {worst:.2e}"
        seen_figures[label] = {"loss_rel": max(abs(seen[s]["loss"] - ref[s]["loss"]) / ref[s]["loss"] for s in seen),
                               "weights_abs": worst}
    print("resume across layouts vs the uninterrupted (MP=1, DP=2) run:", json.dumps(seen_figures))
