"""solver_train.py end to end: loss falls, exact resume, HF export, gradient accumulation, bad input."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from llama_rlhf.data import StepBatches, load_samples, pack
from llama_rlhf.models.pretrained import load_pretrained
from llama_rlhf.parallel.state import single_process_state
from llama_rlhf.tokenizer import load_tokenizer
from llama_rlhf.training.distributed_optimizer import DistributedAdamW
from llama_rlhf.training.sft import train_step
from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, launch_ranks, torchrun

DATA = os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(DATA) as f:
        lines = f.readlines()[:96]
    path.write_text("".join(lines))
    return str(path)


def train_args(ckpt, data, save_dir, *extra):
    return ["--ckpt_dir", ckpt, "--train_file", data, "--save_dir", save_dir, "--use_chat_template", "true",
            "--max_seq_len", "128", "--max_batch_size", "4", "--lr", "3e-3", "--dtype", "float32",
            "--lr_scheduler", "constant", *extra]


def losses(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.parametrize("layout", [(2, 2, 1), (1, 1, 2)], ids=["mp2-sp2", "dp2"])
def test_loss_falls_end_to_end(tiny_model, small_data, tmp_path, layout):
    mp, sp, dp = layout
    out = str(tmp_path / "run")
    proc = torchrun("solver_train.py", train_args(tiny_model, small_data, out, "--max_steps", "20", "--epochs", "4",
                                                  "--model_parallel_size", str(mp),
                                                  "--sequence_parallel_size", str(sp)), nproc=mp * sp * dp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = losses(out)
    assert len(seen) == 20
    first, last = sum(seen[:3]) / 3, sum(seen[-3:]) / 3
    assert last < 0.6 * first, f"loss did not fall: first {seen[:3]}, last {seen[-3:]}"
    assert "step 20/20" in proc.stdout and "ETA" in proc.stdout and "tok/s" in proc.stdout


def test_resume_is_exact_and_export_loads_everywhere(tiny_model, small_data, tmp_path, smollm2_hf):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = ["--model_parallel_size", "2", "--epochs", "1", "--save_steps", "3"]
    proc = torchrun("solver_train.py", train_args(tiny_model, small_data, straight, *common, "--max_steps", "6"), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun("solver_train.py", train_args(tiny_model, small_data, split, *common, "--max_steps", "3"), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun("solver_train.py", train_args(tiny_model, small_data, split, *common, "--max_steps", "6",
                                                  "--resume", "true"), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert losses(straight) == losses(split), (losses(straight), losses(split))
    a = load_file(os.path.join(straight, "checkpoint-6", "model.safetensors"))
    b = load_file(os.path.join(split, "checkpoint-6", "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"

    # the export: transformers loads it and agrees with this framework loading it at another MP (1)
    from transformers import AutoModelForCausalLM
    ckpt = os.path.join(straight, "checkpoint-6")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 17), generator=torch.Generator().manual_seed(0))
    ours = load_pretrained(ckpt, "llama-hf", single_process_state()).eval()
    with torch.no_grad():
        diff = (ours(ids)[..., :49152] - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"exported model: our logits differ from transformers' by {diff:.2e}"
    assert os.path.isfile(os.path.join(ckpt, "tokenizer.json")) and os.path.isfile(os.path.join(ckpt,
                                                                                                "chat_template.jinja"))


def test_gradient_accumulation_matches_bigger_batch(tiny_model, small_data):
    """batch 4 x accumulation 1 and batch 1 x accumulation 4 make the same update."""
    tok = load_tokenizer(tiny_model)
    samples, _ = load_samples(small_data, tok, True, None, 128)
    rows = pack(samples, 128, False)
    ps = single_process_state()
    updated = []
    for micro, accum in ((4, 1), (1, 4)):
        model = load_pretrained(tiny_model, "llama-hf", ps)
        opt = DistributedAdamW(model, ps, stage=0, lr=1e-3, weight_decay=0.1)
        sched = StepBatches(rows, micro, 1, accum, seed=3)
        batches, total = sched.micro_batches(0, 0, 0)
        result = train_step(model, opt, batches, total, ps, torch.float32, tok.pad_id, 1.0, False)
        updated.append(({n: p.detach().clone() for n, p in model.named_parameters()}, result))
    (w1, r1), (w2, r2) = updated
    assert abs(r1.loss - r2.loss) <= 1e-6 and abs(r1.grad_norm - r2.grad_norm) <= 1e-5
    worst = max((w1[n] - w2[n]).abs().max().item() for n in w1)
    assert worst <= 1e-5, f"updates differ by {worst:.2e}"


def expect_failure_on_every_rank(results, *fragments):
    for rank, r in enumerate(results):
        assert r.returncode != 0, f"rank {rank} exited 0"
        for fragment in fragments:
            assert fragment in r.stderr, f"rank {rank}: {fragment!r} not in stderr:\n{r.stderr[-2000:]}"
        assert f"[rank {rank}] error:" in r.stderr


def test_bad_input_errors_on_every_rank(tiny_model, small_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    results = launch_ranks("solver_train.py", train_args(tiny_model, str(bad), str(tmp_path / "o1")), world=2)
    expect_failure_on_every_rank(results, f"{bad}:2", "not valid JSON")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    results = launch_ranks("solver_train.py", train_args(tiny_model, str(empty), str(tmp_path / "o2")), world=2)
    expect_failure_on_every_rank(results, "no usable training samples")

    results = launch_ranks("solver_train.py", train_args(tiny_model, str(tmp_path / "nope.jsonl"),
                                                         str(tmp_path / "o3")), world=2)
    expect_failure_on_every_rank(results, "data file not found", "nope.jsonl")

    held = tmp_path / "held"
    (held / "checkpoint-5").mkdir(parents=True)
    results = launch_ranks("solver_train.py", train_args(tiny_model, small_data, str(held)), world=2)
    expect_failure_on_every_rank(results, "already holds a run", "--resume")


def test_sample_without_response_after_truncation_is_skipped_and_reported(tiny_model, tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [{"instruction": "word " * 300, "output": "x"}, {"instruction": "short question", "output": "short"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(tiny_model)
    samples, stats = load_samples(str(data), tok, True, None, 64)
    assert stats.truncated == 1 and stats.skipped_no_response == 0 and len(samples) == 2
    # the long prompt was cut from the left: its generation header survives right before the response
    header = tok.encode("<|im_start|>assistant\n")
    ids = samples[0].ids
    first_trained = next(i for i, t in enumerate(samples[0].labels) if t != -100) + 1
    assert ids[first_trained - len(header):first_trained] == header
    assert len(ids) == 64 and tok.decode(samples[0].labels[-3:-1]) == "x"
    # a multi-turn chat is cut from the right: when no assistant token survives, the sample is skipped and counted
    long_chat = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "a"},
                              {"role": "user", "content": "more"}, {"role": "assistant", "content": "b"}]}
    data.write_text(json.dumps(long_chat) + "\n" + json.dumps(rows[1]) + "\n")
    samples, stats = load_samples(str(data), tok, True, None, 32)
    assert len(samples) == 1 and stats.skipped_no_response == 1
    data.write_text(json.dumps(long_chat) + "\n")
    with pytest.raises(Exception, match="no usable training samples .1 had no response tokens left"):
        load_samples(str(data), tok, True, None, 32)


def test_pretraining_from_scratch_with_packing_eval_and_checkpoint_rotation(tiny_model, smollm2_dir, tmp_path):
    """--from_scratch --config_file on raw text, packed rows, activation checkpointing, eval, keep 2 checkpoints."""
    with open(DATA) as f:
        texts = [json.loads(line)["output"] for line in f][:120]
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:100]))
    evaluation.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[100:]))
    out = str(tmp_path / "pretrain")
    args = ["--from_scratch", "true", "--config_file", os.path.join(tiny_model, "config.json"),
            "--tokenizer_file", smollm2_dir, "--model_type", "llama-hf", "--train_file", str(train),
            "--eval_file", str(evaluation), "--eval_steps", "5", "--save_dir", out, "--packing", "true",
            "--activation_checkpointing", "true", "--max_seq_len", "128", "--max_batch_size", "2",
            "--lr", "3e-3", "--lr_scheduler", "linear", "--warmup_steps", "2", "--dtype", "float32",
            "--epochs", "10", "--max_steps", "15", "--save_steps", "5", "--save_total_limit", "2",
            "--model_parallel_size", "2"]
    proc = torchrun("solver_train.py", args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 3 and evals[-1] < evals[0] - 1.0, evals
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert metrics[0]["lr"] < metrics[1]["lr"] and metrics[-1]["lr"] < metrics[2]["lr"]  # warmup, then decay
    kept = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert kept == ["checkpoint-10", "checkpoint-15"], kept


def test_activation_checkpointing_changes_nothing_but_memory(tiny_model, small_data):
    tok = load_tokenizer(tiny_model)
    samples, _ = load_samples(small_data, tok, True, None, 128)
    rows = pack(samples, 128, True)
    ps = single_process_state()
    results = []
    for checkpointing in (False, True):
        model = load_pretrained(tiny_model, "llama-hf", ps)
        model.activation_checkpointing = checkpointing
        opt = DistributedAdamW(model, ps, stage=0, lr=1e-3)
        batches, total = StepBatches(rows, 2, 1, 2, seed=1).micro_batches(0, 0, 0)
        r = train_step(model, opt, batches, total, ps, torch.float32, tok.pad_id, 1.0, True)
        results.append((r.loss, {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


def test_lm_head_only_on_trained_positions_changes_nothing():
    """forward_loss_sum runs the LM head only where a label is trained (not on prompt or padding positions):
    its loss and every gradient equal plain cross-entropy over the full logits."""
    import torch.nn.functional as F

    from llama_rlhf.data import Row, collate
    from llama_rlhf.models.config import ModelConfig
    from llama_rlhf.models.init import init_weights
    from llama_rlhf.models.pretrained import build_model
    from llama_rlhf.training.sft import forward_loss_sum
    torch.set_default_dtype(torch.float64)
    try:
        cfg = ModelConfig("llama-hf", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                          max_position_embeddings=64)
        ps = single_process_state()
        model = build_model(cfg, ps, torch.float64)
        init_weights(model, seed=3)
        g = torch.Generator().manual_seed(0)
        rows = []
        for n, prompt in ((12, 5), (9, 7), (7, 0)):  # prompts of different lengths (masked), padding after row 2, 3
            ids = torch.randint(0, 96, (n,), generator=g).tolist()
            labels = [-100] * prompt + ids[prompt + 1:] + [-100]
            rows.append(Row(ids, labels, list(range(n)), [0] * n))
        batch = collate(rows, pad_id=0)
        assert (batch["labels"] == -100).sum() > 10
        loss = forward_loss_sum(model, batch, ps, torch.float64, packing=False)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        logits = model(batch["input_ids"], position_ids=batch["position_ids"])[..., :cfg.vocab_size]
        reference = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch["labels"].reshape(-1),
                                    ignore_index=-100, reduction="sum")
        reference.backward()
        assert abs(loss.item() - reference.item()) <= 1e-10 * abs(reference.item())
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name], p.grad, rtol=0, atol=1e-12), name
    finally:
        torch.set_default_dtype(torch.float32)
