"""GRPO on sharded models: loss and gradients vs the single process, sampler vs trainer log-probs,
end to end (reward rises, groups stay whole at DP=2), and bad reward specs."""
import json
import os

import pytest
import torch

from llama_rlhf.models.config import ModelConfig
from llama_rlhf.models.init import init_weights
from llama_rlhf.models.pretrained import build_model
from llama_rlhf.parallel.comm import all_reduce
from llama_rlhf.parallel.layers import take_shard
from llama_rlhf.parallel.state import single_process_state
from llama_rlhf.training.grad_sync import GradientSync
from llama_rlhf.training.grpo import Prompt, Rollout, fill_logprobs, grpo_backward
from llama_rlhf.training.grpo_loss import LossConfig
from tests.distributed import assert_check, grid, run_checks
from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, launch_ranks, torchrun

TEMPERATURE = 0.7


def tiny_config():
    return ModelConfig("llama-hf", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64)


def synthetic_rollouts(seed=0, groups=2, group_size=3):
    """Fixed rollouts with off-policy old log-probs, reference log-probs and advantages."""
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for p in range(groups):
        prompt = Prompt(p, torch.randint(0, 97, (int(torch.randint(3, 7, (1,), generator=g)),),
                                         generator=g).tolist(), {})
        for s in range(group_size):
            n = int(torch.randint(1, 9, (1,), generator=g))
            r = Rollout(prompt, s, torch.randint(0, 97, (n,), generator=g).tolist(), "stop" if s else "length", [])
            r.advantage = float(torch.randn((), generator=g))
            r.old_logprobs = -3 - torch.rand(n, generator=g)
            r.ref_logprobs = -3 - torch.rand(n, generator=g)
            rollouts.append(r)
    return rollouts


def run_grpo_backward(model, rollouts, ps, loss, mask_truncated):
    tokens = sum(len(r.completion_ids) for r in rollouts if not (mask_truncated and r.truncated))
    return grpo_backward(model, rollouts, ps, temperature=TEMPERATURE, compute_dtype=torch.float32, pad_id=0,
                         loss=loss, global_sequences=len(rollouts), global_tokens=tokens, global_micro_batches=1,
                         max_completion_length=8, mask_truncated=mask_truncated, on_policy=False)


ALL_LAYOUTS, SP_LAYOUTS = ((2, 1), (1, 2), (2, 2)), ((2, 2),)
# (loss, mask truncated completions, layouts): the clipped loss types everywhere, each newer variant at MP=2 x SP=2
SHARDED_CASES = [(LossConfig(t, 0.2, 0.28, beta=0.05, kl_estimator="k3"), t == "grpo", ALL_LAYOUTS)
                 for t in ("grpo", "bnpo", "dr_grpo", "dapo")] + [
    (LossConfig("cispo", beta=0.05, cispo_epsilon_max=0.3), False, SP_LAYOUTS),
    (LossConfig("sapo", beta=0.05), True, SP_LAYOUTS),
    (LossConfig("grpo", 0.2, 0.28, beta=0.05, importance_sampling_level="sequence"), True, ((1, 2), (2, 2))),
    (LossConfig("dapo", 0.2, 0.28, beta=0.05, delta=1.3, entropy_coef=0.03), False, SP_LAYOUTS),
    (LossConfig("cispo", importance_sampling_level="sequence", entropy_coef=0.03), False, SP_LAYOUTS)]


def check_sharded_loss_and_grads_equal_single_process(*_):
    rollouts = synthetic_rollouts()
    single = single_process_state()
    for cfg, mask_truncated, layouts in SHARDED_CASES:
        loss_type = f"{cfg.loss_type}/{cfg.importance_sampling_level}/{cfg.kl_estimator}"
        ref_model = build_model(tiny_config(), single)
        init_weights(ref_model, seed=1)
        ref = run_grpo_backward(ref_model, rollouts, single, cfg, mask_truncated)
        ref_grads = dict((n, p.grad) for n, p in ref_model.named_parameters())
        for mp, sp in layouts:
            ps = grid(mp, sp)
            model = build_model(tiny_config(), ps)
            init_weights(model, seed=1)
            stats = run_grpo_backward(model, rollouts, ps, cfg, mask_truncated)
            GradientSync(model, ps).reduce_model_parallel()
            loss = all_reduce(torch.tensor(stats.loss, dtype=torch.float64), ps.sp_group).item()
            assert abs(loss - ref.loss) <= 1e-5 * max(1.0, abs(ref.loss)), f"{loss_type} MP={mp} SP={sp}: loss"
            for name, p in model.named_parameters():
                grad = all_reduce(p.grad, ps.sp_group)  # SP ranks hold the gradients of their own tokens
                expected = take_shard(ref_grads[name], p.shard)
                err = (grad - expected).abs().max().item() / max(expected.abs().max().item(), 1e-6)
                assert err <= 1e-5, f"{loss_type} MP={mp} SP={sp}: grad of {name} off by {err:.2e} (relative)"


def check_trainer_log_probs_equal_sampler_log_probs(*_):
    from llama_rlhf.inference.engine import generate
    from llama_rlhf.inference.sampling import SamplingParams
    for mp in (1, 2):
        ps = grid(mp, 1)
        model = build_model(tiny_config(), ps)
        init_weights(model, seed=2)
        with torch.no_grad():  # sharper logits than the tiny init gives, so the test is not trivially uniform
            for p in model.parameters():
                p.mul_(8.0 if p.dim() > 1 else 1.0)
        prompts = [Prompt(0, [5, 6, 7], {}), Prompt(1, [9, 3, 2, 11, 4], {})]
        params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=8, num_samples=3)
        out = generate(model, [p.ids for p in prompts], params, {96}, ps, max_batch_size=6, seed=5)
        rollouts = [Rollout(p, s, c.token_ids, c.finish_reason, c.logprobs)
                    for p, samples in zip(prompts, out) for s, c in enumerate(samples)]
        fill_logprobs(model, rollouts, ps, "old_logprobs", TEMPERATURE, torch.float32, 0, micro_batch=4)
        for r in rollouts:
            diff = (r.old_logprobs - torch.tensor(r.sampler_logprobs)).abs().max().item()
            assert diff <= 1e-4, f"MP={mp}: trainer and sampler log-probs differ by {diff:.2e}"


def sharp_model(ps, seed=2):
    model = build_model(tiny_config(), ps)
    init_weights(model, seed=seed)
    with torch.no_grad():  # sharper logits than the tiny init gives
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model


def check_sp_rollouts_are_split_and_equal_sp1(*_):
    from llama_rlhf.inference.engine import generate
    from llama_rlhf.inference.sampling import SamplingParams
    from llama_rlhf.training import sp_rollouts
    prompts = [[5, 6, 7], [9, 3, 2, 11, 4], [1, 2], [40, 41, 42, 43], [7] * 6]
    keys = [10, 11, 12, 13, 14]
    reference_model, model = sharp_model(grid(1, 1)), sharp_model(grid(1, 2))
    ps = grid(1, 2)
    calls = []

    def counted(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(model, prompts, *args, **kwargs)

    sp_rollouts.generate, original = counted, sp_rollouts.generate
    try:
        for temperature in (0.0, TEMPERATURE):  # greedy, and sampling from keyed random streams
            params = SamplingParams(temperature=temperature, max_new_tokens=8, num_samples=3)
            want = generate(reference_model, prompts, params, {96}, grid(1, 1), max_batch_size=15, seed=5,
                            prompt_keys=keys)
            got = sp_rollouts.generate_rollouts(model, prompts, params, {96}, ps, prompt_keys=keys, seed=5)
            for w, g in zip(want, got, strict=True):
                for a, b in zip(w, g, strict=True):
                    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason, (temperature, a, b)
                    assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) <= 1e-5
    finally:
        sp_rollouts.generate = original
    assert calls == [3 - ps.sp_rank] * 2, calls  # SP rank 0 sampled prompts 0, 2, 4; rank 1 prompts 1, 3


def check_logits_in_row_chunks_equal_whole(*_):
    from llama_rlhf.training.update_batch import rollout_batch
    from llama_rlhf.training.logprobs import local_part, token_logprobs
    ps = grid(2, 1)
    model = sharp_model(ps)
    rollouts = synthetic_rollouts(seed=3)
    batch = local_part(rollout_batch(rollouts, 0, 1), ps)
    weight = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(0))
    results = []
    for rows in (None, 3):  # whole (one chunk), and chunks of 3 rows recomputed in backward
        model.zero_grad()
        logp, entropy = token_logprobs(model, batch, ps, TEMPERATURE, torch.float32, with_entropy=True,
                                       chunk_rows=rows)
        (logp * weight).sum().backward()
        results.append((logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, e0, g0), (lp1, e1, g1) = results
    assert (batch["labels"] != -100).sum() > 6  # several chunks
    assert torch.allclose(lp0, lp1, atol=1e-6) and torch.allclose(e0, e1, atol=1e-6)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-5), name


CHECKS = [check_sharded_loss_and_grads_equal_single_process, check_trainer_log_probs_equal_sampler_log_probs,
          check_sp_rollouts_are_split_and_equal_sp1, check_logits_in_row_chunks_equal_whole]


@pytest.fixture(scope="module")
def report():
    return run_checks(4, CHECKS)


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_grpo_parallel(report, name):
    assert_check(report, name)


RECORDING_REWARD = '''
import json, os

def even_ids(completion, sample):
    """Reward the share of even token ids; record which rank scored which prompt."""
    with open(os.environ["GRPO_TEST_LOG"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ["RANK"]), "id": sample["id"]}) + "\\n")
    ids = sample["completion_ids"]
    return sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1)
'''


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, smollm2_dir):
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir)


def grpo_args(ckpt, data, out, reward, *extra):
    return ["--ckpt_dir", ckpt, "--train_file", data, "--save_dir", out, "--reward_funcs", reward,
            "--num_samples_per_prompt", "4", "--max_batch_size", "2", "--max_new_tokens", "12", "--lr", "1e-2",
            "--dtype", "float32", "--use_chat_template", "--max_seq_len", "160", "--top_k", "8", *extra]


def test_reward_rises_end_to_end_and_groups_stay_whole(tiny_chat, tmp_path, monkeypatch):
    data = tmp_path / "prompts.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "grpo_arithmetic.jsonl")) as f:
        rows = [json.loads(line) for line in f][:24]
    data.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(rows)))
    reward_file = tmp_path / "even.py"
    reward_file.write_text(RECORDING_REWARD)
    log = tmp_path / "scored.jsonl"
    monkeypatch.setenv("GRPO_TEST_LOG", str(log))
    out = str(tmp_path / "run")
    proc = torchrun("solver_grpo.py", grpo_args(tiny_chat, str(data), out, f"{reward_file}:even_ids",
                                                "--max_steps", "16", "--epochs", "3"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    rewards = [m["reward_mean"] for m in metrics]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last >= first + 0.2, f"mean reward did not rise: {rewards}"
    assert {"kl", "clip_low", "clip_high", "entropy", "completion_len_mean", "truncated_rate",
            "reward/" + f"{reward_file}:even_ids"} <= set(metrics[0])
    # every prompt's whole group was scored on one DP rank, and both ranks worked
    with open(log) as f:
        scored = [json.loads(line) for line in f]
    assert {s["rank"] for s in scored} == {0, 1}
    per_step_counts = {}
    for s in scored:
        per_step_counts[(s["id"], s["rank"])] = per_step_counts.get((s["id"], s["rank"]), 0) + 1
    assert all(count % 4 == 0 for count in per_step_counts.values()), "a group was split across ranks"


def test_bad_reward_specs_fail_on_every_rank(tiny_chat, tmp_path):
    data = os.path.join(ROOT, "examples", "data", "grpo_arithmetic.jsonl")
    for reward, fragment in [("accuracy,shiny", "unknown reward 'shiny'"),
                             (f"{tmp_path}/missing.py:f", "missing.py not found")]:
        results = launch_ranks("solver_grpo.py", grpo_args(tiny_chat, data, str(tmp_path / "o"), reward), world=2)
        for rank, r in enumerate(results):
            assert r.returncode != 0 and fragment in r.stderr and f"[rank {rank}] error:" in r.stderr, r.stderr
    raising = tmp_path / "raising.py"
    raising.write_text("def boom(completion, sample):\n    raise ValueError('no answer field')\n")
    results = launch_ranks("solver_grpo.py", grpo_args(tiny_chat, data, str(tmp_path / "o2"), f"{raising}:boom",
                                                       "--max_steps", "1"), world=2)
    for rank, r in enumerate(results):
        assert r.returncode != 0 and "raised ValueError: no answer field" in r.stderr, r.stderr


def test_resume_continues_exactly(tiny_chat, tmp_path):
    data = os.path.join(ROOT, "examples", "data", "grpo_arithmetic.jsonl")
    reward_file = tmp_path / "even.py"
    reward_file.write_text("def even_ids(completion, sample):\n"
                           "    ids = sample['completion_ids']\n"
                           "    return sum(t % 2 == 0 for t in ids) / max(len(ids), 1)\n")
    reward = f"{reward_file}:even_ids"

    def metrics(out):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [(m["reward_mean"], m["loss"]) for m in map(json.loads, f)]

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    for out, steps, extra in ((straight, "4", []), (split, "2", []), (split, "4", ["--resume", "true"])):
        proc = torchrun("solver_grpo.py", grpo_args(tiny_chat, data, out, reward, "--max_steps", steps, *extra), 1)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics(straight) == metrics(split)
    assert len(metrics(split)) == 4
