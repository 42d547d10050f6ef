"""GRPO rollouts in another precision (inference/rollout_model.py, solver_grpo --rollout_dtype /
--rollout_quantization int8): the copy's log-probs against the fp32 policy within measured bounds (a tiny model
and SmolLM2), bf16 rollouts equal a bf16 model exactly, the copy tracks the policy after optimizer steps (shared
tensors, in-place refresh, LoRA adapters on top), the loss uses the trainer's log-probs and never the sampler's,
the mismatch reaches metrics.jsonl (MP=2, gloo), the planner counts the copy's bytes exactly, bad flags fail in
one line.

Bounds, teacher-forced chat sequences (4 arithmetic prompts + answers, 310 scored tokens), |log p_copy - log p_fp32|:
SmolLM2-135M-Instruct measured mean / max: bf16 0.049 / 0.28; int8 (fp32 activations) 0.093 / 0.55; int8 + bf16
activations 0.099 / 0.57; fp16 0.006 / 0.057. Asserted with 1.5x headroom (SMOLLM2_BOUNDS).
"""
import json
import math
import os

import pytest
import torch

from llama_rlhf import plan as planner
from llama_rlhf.inference.rollout_model import RolloutModel
from llama_rlhf.models.config import ModelConfig
from llama_rlhf.models.init import init_weights
from llama_rlhf.models.pretrained import build_model
from llama_rlhf.parallel.state import single_process_state
from llama_rlhf.training.grpo import Prompt, Rollout, fill_logprobs, grpo_backward, off_policy_mismatch
from llama_rlhf.training.grpo_loss import LossConfig
from llama_rlhf.training.logprobs import token_logprobs
from tests.distributed import assert_check, grid, run_checks
from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, torchrun

TEMPERATURE = 0.7
# (dtype, quantization) -> (mean, max) bound of |delta log p| vs fp32; measured values in the module docstring
SMOLLM2_BOUNDS = {("bfloat16", None): (0.075, 0.42), ("float32", "int8"): (0.14, 0.83),
                  ("bfloat16", "int8"): (0.15, 0.86), ("float16", None): (0.01, 0.09)}
# the tiny sharpened model (logits of several nats), measured mean / max: bf16 0.0080 / 0.035, int8 0.013 / 0.047
# (MP=2 int8: 0.012 / 0.087, its row-parallel slices have their own per-row scales)
TINY_BOUNDS = {("bfloat16", None): (0.012, 0.053), ("float32", "int8"): (0.02, 0.13)}


def tiny_config():
    return ModelConfig("llama-hf", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64)


def sharp_model(ps, seed=2):
    """A tiny random model with logits of several nats (the plain init is almost uniform)."""
    model = build_model(tiny_config(), ps)
    init_weights(model, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model


def token_batch(seqs: list[list[int]]) -> dict:
    """Teacher-forced batch: every next token of each sequence is scored."""
    length = max(map(len, seqs))
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(s) - 1] = torch.tensor(s[1:])
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(length).repeat(len(seqs), 1)}


def logprob_gap(model, copy: RolloutModel, batch, ps, temperature=1.0) -> tuple[float, float]:
    """(mean, max) |log p_copy - log p_model| over the scored tokens."""
    batch = {k: v.to(ps.device) for k, v in batch.items()}
    with torch.no_grad():
        ref, _ = token_logprobs(model, batch, ps, temperature, torch.float32)
        got, _ = token_logprobs(copy.model, batch, ps, temperature, copy.dtype)
    gap = (got - ref)[batch["labels"] != -100].abs()
    return gap.mean().item(), gap.max().item()


def random_seqs(seed=0, n=4, length=20):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (length - i,), generator=g).tolist() for i in range(n)]


def planned_copy_bytes(cfg, mp, dtype, quant, source="float32"):
    job = planner.Job("grpo", "float32", rollout_dtype=dtype, rollout_quantization=quant)
    return planner.rollout_copy_bytes(cfg, mp, job, source)


# -- one process --------------------------------------------------------------------------------------------------
def test_tiny_copy_logprobs_within_bound_and_bytes_as_planned():
    ps = single_process_state()
    model = sharp_model(ps)
    batch = token_batch(random_seqs())
    for (dtype, quant), (mean_bound, max_bound) in TINY_BOUNDS.items():
        copy = RolloutModel(model, getattr(torch, dtype), quant)
        mean, worst = logprob_gap(model, copy, batch, ps)
        assert 0 < mean <= mean_bound and worst <= max_bound, f"{dtype}/{quant}: mean {mean:.2e}, max {worst:.2e}"
        assert copy.nbytes == planned_copy_bytes(tiny_config(), 1, dtype, quant)


def test_bf16_rollouts_from_fp32_masters_are_a_bf16_model():
    """The bf16 copy computes exactly what the model cast to bf16 computes (no autocast, nothing kept fp32 but the
    rotary tables), and sampling from it gives that model's tokens."""
    from llama_rlhf.inference.engine import generate
    from llama_rlhf.inference.sampling import SamplingParams
    ps = single_process_state()
    model = sharp_model(ps)
    copy = RolloutModel(model, torch.bfloat16)
    cast = sharp_model(ps).to(torch.bfloat16)
    ids = torch.tensor([s[:10] for s in random_seqs(n=2, length=12)])
    with torch.no_grad():
        assert torch.equal(copy.model(ids), cast(ids))
    assert all(p.dtype == torch.bfloat16 for p in copy.model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the masters are untouched
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=6, num_samples=3)
    a = generate(copy.model, [[5, 6, 7], [9, 3]], params, {96}, ps, seed=3, compute_dtype=torch.bfloat16)
    b = generate(cast, [[5, 6, 7], [9, 3]], params, {96}, ps, seed=3, compute_dtype=torch.bfloat16)
    assert [[c.token_ids for c in s] for s in a] == [[c.token_ids for c in s] for s in b]


def optimizer_step(model, ps, lr=0.05):
    """One AdamW step of the training code on a next-token loss; returns the optimizer."""
    from llama_rlhf.training.distributed_optimizer import DistributedAdamW
    opt = getattr(model, "_test_opt", None) or DistributedAdamW(model, ps, stage=0, lr=lr)
    model._test_opt = opt
    batch = token_batch(random_seqs(seed=7))
    opt.start_micro_batch(last=True)
    logp, _ = token_logprobs(model, batch, ps, 1.0, torch.float32)
    (-logp.sum()).backward()
    opt.step(0.0)
    return opt


def test_copy_tracks_the_policy_after_updates():
    ps = single_process_state()
    model = sharp_model(ps)
    bf16, int8 = RolloutModel(model, torch.bfloat16), RolloutModel(model, torch.float32, "int8")
    # fp32 int8 copy: embedding, norms, LM head are the policy's own tensors (nothing to copy)
    assert int8.model.model.norm.weight is model.model.norm.weight
    assert int8.model.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert int8.refreshed_tensors == 7 * 2  # the decoder linears only
    q_proj = model.model.layers[0].self_attn.q_proj
    before = int8.model.model.layers[0].self_attn.q_proj.quant.dequantize().clone()
    optimizer_step(model, ps)
    assert (q_proj.weight - before).abs().max() > 1e-2  # the step moved the weights
    assert torch.equal(int8.model.model.layers[0].self_attn.q_proj.quant.dequantize(), before)  # stale until refresh
    for copy in (bf16, int8):
        copy.mark_stale()
        assert copy.refresh() == copy.refreshed_tensors and copy.refresh() == 0  # once per update
    cast = {n: p.to(torch.bfloat16) for n, p in model.named_parameters()}
    assert all(torch.equal(p, cast[n]) for n, p in bf16.model.named_parameters())
    for name, layer in model.named_modules():
        if name.endswith("_proj"):
            q = dict(int8.model.named_modules())[name].quant
            bound = layer.weight.abs().amax(dim=1, keepdim=True) / 254 + 1e-7
            assert ((q.dequantize() - layer.weight).abs() <= bound).all(), name
    batch = token_batch(random_seqs())
    for copy, (mean_bound, max_bound) in ((bf16, TINY_BOUNDS[("bfloat16", None)]),
                                          (int8, TINY_BOUNDS[("float32", "int8")])):
        mean, worst = logprob_gap(model, copy, batch, ps)
        assert mean <= mean_bound and worst <= max_bound, (mean, worst)


def test_lora_adapters_run_on_top_of_the_int8_copy():
    from llama_rlhf.models.lora import LoRASpec, apply_lora
    ps = single_process_state()
    model = sharp_model(ps)
    apply_lora(model, LoRASpec(4, 8.0), seed=1)
    copy = RolloutModel(model, torch.float32, "int8")
    assert copy.refreshed_tensors == 0  # the base is frozen: quantized once; adapters are the policy's own
    layer = model.model.layers[1].mlp.down_proj
    assert copy.model.model.layers[1].mlp.down_proj.lora_B is layer.lora_B
    ids = torch.tensor([s[:10] for s in random_seqs(n=2, length=12)])
    with torch.no_grad():
        before = copy.model(ids)
    optimizer_step(model, ps, lr=0.2)  # trains only the adapters
    assert layer.lora_B.weight.abs().max() > 0.1
    # reference: the same base quantized by QLoRA's own code, the trained adapters copied in
    from llama_rlhf.models.quant import quantize_base
    reference = sharp_model(ps)
    quantize_base(reference, "int8")
    apply_lora(reference, LoRASpec(4, 8.0), seed=1)
    trained = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if ".lora_" in n:
                p.copy_(trained[n])
        after, expected = copy.model(ids), reference(ids)
    assert torch.equal(after, expected) and (after - before).abs().max() > 0.1


def test_smollm2_copy_logprobs_within_bound_and_bytes_as_planned(smollm2_dir):
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.tokenizer import load_tokenizer
    ps = single_process_state()
    model = load_pretrained(smollm2_dir, "llama-hf", ps).eval()
    tok = load_tokenizer(smollm2_dir, model_type="llama-hf")
    with open(os.path.join(ROOT, "examples", "data", "grpo_arithmetic.jsonl")) as f:
        rows = [json.loads(line) for line in f][:4]
    batch = token_batch([tok.encode_chat([{"role": "user", "content": r["instruction"]},
                                          {"role": "assistant", "content": f"The answer is <answer>{r['answer']}"
                                                                           f"</answer>."}]) for r in rows])
    cfg = model.cfg
    for (dtype, quant), (mean_bound, max_bound) in SMOLLM2_BOUNDS.items():
        copy = RolloutModel(model, getattr(torch, dtype), quant)
        mean, worst = logprob_gap(model, copy, batch, ps)
        assert mean <= mean_bound and worst <= max_bound, f"{dtype}/{quant}: mean {mean:.3f}, max {worst:.3f}"
        assert copy.nbytes == planned_copy_bytes(cfg, 1, dtype, quant), (dtype, quant, copy.nbytes)
        del copy


def synthetic_rollouts(seed=0, groups=2, group_size=3):
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for p in range(groups):
        prompt = Prompt(p, torch.randint(0, 97, (int(torch.randint(3, 7, (1,), generator=g)),),
                                         generator=g).tolist(), {})
        for s in range(group_size):
            n = int(torch.randint(2, 9, (1,), generator=g))
            r = Rollout(prompt, s, torch.randint(0, 97, (n,), generator=g).tolist(), "stop", [])
            r.advantage = float(torch.randn((), generator=g))
            rollouts.append(r)
    return rollouts


def backward_grads(model, rollouts, ps, on_policy, measure=False):
    model.zero_grad(set_to_none=True)
    tokens = sum(len(r.completion_ids) for r in rollouts)
    stats = grpo_backward(model, rollouts, ps, temperature=TEMPERATURE, compute_dtype=torch.float32, pad_id=0,
                          loss=LossConfig("dapo", 0.2, 0.2), global_sequences=len(rollouts), global_tokens=tokens,
                          global_micro_batches=1, max_completion_length=8, mask_truncated=False,
                          on_policy=on_policy, measure_mismatch=measure)
    return stats, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_ratio_uses_the_trainer_log_probs_never_the_sampler_ones():
    """Sampler log-probs 3 nats off the trainer's change nothing in the loss or the gradients (on- and
    off-policy), and show up as a mismatch of exactly 3; feeding them in as old log-probs (a leak) would change
    the gradients, so this test would catch one."""
    ps = single_process_state()
    model = sharp_model(ps)
    rollouts = synthetic_rollouts()
    fill_logprobs(model, rollouts, ps, "old_logprobs", TEMPERATURE, torch.float32, 0, micro_batch=4)
    trainer = {id(r): r.old_logprobs.clone() for r in rollouts}
    for r in rollouts:
        r.sampler_logprobs = (trainer[id(r)] - 3.0).tolist()
    stats, grads = backward_grads(model, rollouts, ps, on_policy=True, measure=True)
    tokens = sum(len(r.completion_ids) for r in rollouts)
    assert stats.mismatch_tokens == tokens
    assert abs(stats.mismatch_abs / tokens - 3.0) < 1e-5 and abs(float(stats.mismatch_max) - 3.0) < 1e-5
    assert abs(stats.mismatch_kl / tokens - (math.exp(3.0) - 1 - 3.0)) < 1e-3  # k3 of d = +3
    for r in rollouts:
        r.sampler_logprobs = trainer[id(r)].tolist()  # a sampler that agrees exactly
    _, exact = backward_grads(model, rollouts, ps, on_policy=True)
    assert all(torch.equal(grads[n], exact[n]) for n in grads)
    _, off = backward_grads(model, rollouts, ps, on_policy=False)  # old = the trainer's recomputed ones
    assert all((off[n] - exact[n]).abs().max() <= 1e-5 * exact[n].abs().max() + 1e-9 for n in grads)
    for r in rollouts:  # off-policy path of the loop: mismatch from the recomputed old log-probs, whole rollouts
        r.sampler_logprobs = (trainer[id(r)] + 0.5).tolist()
    m = off_policy_mismatch(rollouts, ps.device)
    assert abs(m.mismatch_abs / m.mismatch_tokens - 0.5) < 1e-5 and m.mismatch_tokens == tokens
    for r in rollouts:  # the leak the code must not have: sampler log-probs as the old ones
        r.old_logprobs = torch.tensor(r.sampler_logprobs) - 3.5
    _, leaked = backward_grads(model, rollouts, ps, on_policy=False)
    assert max((leaked[n] - exact[n]).abs().max().item() for n in grads) > 1e-3


def test_bad_flag_combinations_are_one_line_errors():
    import solver_grpo
    from llama_rlhf.runtime import UsageError
    base = ["--ckpt_dir", "x", "--train_file", "t.jsonl", "--save_dir", "o"]
    with pytest.raises(UsageError) as err:
        solver_grpo.parse_args(base + ["--rollout_quantization", "int8", "--lora_rank", "8", "--quantize_base",
                                       "nf4"])
    assert "--rollout_quantization int8 with --quantize_base nf4" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit):
        solver_grpo.parse_args(base + ["--rollout_quantization", "int4"])
    with pytest.raises(SystemExit):
        solver_grpo.parse_args(base + ["--rollout_dtype", "float64"])
    with pytest.raises(planner.PlanError, match="--rollout_quantization int8 with --quantize_base int8"):
        planner._job(planner.parse_args(["--job", "grpo", "--lora_rank", "8", "--quantize_base", "int8",
                                         "--rollout_quantization", "int8"]))


# -- MP = 2 (gloo) ------------------------------------------------------------------------------------------------
def check_mp2_copy_within_bound_refreshed_and_planned(*_):
    ps, single = grid(2, 1), grid(1, 1)
    reference, model = sharp_model(single), sharp_model(ps)
    batch = token_batch(random_seqs())
    for (dtype, quant), (mean_bound, max_bound) in TINY_BOUNDS.items():
        copy = RolloutModel(model, getattr(torch, dtype), quant)
        b = {k: v.to(ps.device) for k, v in batch.items()}
        with torch.no_grad():
            ref, _ = token_logprobs(reference, b, single, 1.0, torch.float32)  # the unsharded fp32 model
            got, _ = token_logprobs(copy.model, b, ps, 1.0, copy.dtype)
        gap = (got - ref)[b["labels"] != -100].abs()
        assert gap.mean() <= mean_bound and gap.max() <= max_bound, (dtype, quant, gap.mean(), gap.max())
        assert copy.nbytes == planned_copy_bytes(tiny_config(), 2, dtype, quant)
    copy = RolloutModel(model, torch.float32, "int8")
    optimizer_step(model, ps)
    copy.mark_stale()
    copy.refresh()
    mean, worst = logprob_gap(model, copy, batch, ps)
    assert mean <= TINY_BOUNDS[("float32", "int8")][0] and worst <= TINY_BOUNDS[("float32", "int8")][1]


@pytest.fixture(scope="module")
def mp2_report():
    return run_checks(2, [check_mp2_copy_within_bound_refreshed_and_planned])


def test_mp2_copy_within_bound_refreshed_and_planned(mp2_report):
    assert_check(mp2_report, "check_mp2_copy_within_bound_refreshed_and_planned")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, smollm2_dir):
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir)


@pytest.mark.parametrize("extra", [["--rollout_dtype", "bfloat16", "--rollout_quantization", "int8"],
                                   ["--rollout_quantization", "int8", "--steps_per_rollout", "2"]],
                         ids=["bf16_int8_on_policy", "int8_two_updates"])
def test_solver_logs_the_mismatch_at_mp2(tiny_chat, tmp_path, extra):
    out = str(tmp_path / "run")
    args = ["--ckpt_dir", tiny_chat, "--train_file", os.path.join(ROOT, "examples", "data", "grpo_arithmetic.jsonl"),
            "--save_dir", out, "--reward_funcs", "format", "--num_samples_per_prompt", "2", "--max_batch_size", "2",
            "--max_new_tokens", "6", "--lr", "1e-2", "--dtype", "float32", "--use_chat_template", "--max_seq_len",
            "128", "--max_steps", "2", "--model_parallel_size", "2", "--log_completions_steps", "0", *extra]
    proc = torchrun("solver_grpo.py", args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rollout copy:" in proc.stdout + proc.stderr
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2
    for r in records:  # top_k 0, top_p 1: precision is the only difference (the tiny model is nearly uniform)
        assert 0 < r["rollout_logprob_diff_mean"] <= r["rollout_logprob_diff_max"] <= 0.05, r
        assert 0 <= r["rollout_kl"] <= 1e-3, r
