"""Generation-based checks during training, end to end on a tiny model:

- GRPO --eval_file: eval/<reward>, eval/mean@n, eval/pass@k at step 0, every --eval_steps and at the last step;
  the step-0 scores equal solver_generate's summary.json for the initial model with the same sampling (same
  engine, same rewards); TensorBoard holds them; the plot of the real log is written.
- SFT --sample_prompts_file: greedy answers logged at step 0, every --sample_steps and at the last step; the
  last ones equal solver_generate's greedy answers from the saved checkpoint.
- An eval file lacking the answers a reward needs fails on every rank before any model is loaded.
"""
import json
import os

import pytest

from llama_rlhf.training.evaluation import EVAL_SEED, due
from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, launch_ranks, torchrun

EVEN_CHARS = "def even_chars(completion, sample):\n    return 1.0 if len(completion) % 2 == 0 else 0.0\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("evaluation")
    model = write_tiny_chat_model(str(root / "model"), smollm2_dir, seed=3, initializer_range=0.3)
    with open(os.path.join(ROOT, "examples", "data", "grpo_arithmetic.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:13]))
    (root / "reward.py").write_text(EVEN_CHARS)
    return model, root


def read_metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_due():
    assert [s for s in range(8) if due(s, 3, 7)] == [0, 3, 6, 7]
    assert [s for s in range(6) if due(s, 0, 5)] == [0, 5]


def grpo_args(model, root, out, *extra):
    return ["--ckpt_dir", model, "--train_file", str(root / "train.jsonl"), "--save_dir", out,
            "--reward_funcs", f"{root}/reward.py:even_chars,format", "--num_samples_per_prompt", "4",
            "--max_batch_size", "2", "--max_new_tokens", "8", "--lr", "1e-2", "--dtype", "float32",
            "--use_chat_template", "--max_seq_len", "160", "--seed", "11", *extra]


def test_grpo_eval_at_step_0_and_every_eval_steps(setup):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llama_rlhf.plot import plot_run
    model, root = setup
    out = str(root / "grpo")
    proc = torchrun("solver_grpo.py", grpo_args(model, root, out, "--max_steps", "3", "--epochs", "2", "--eval_file",
                                                str(root / "eval.jsonl"), "--eval_steps", "2",
                                                "--eval_num_samples", "4", "--report_to", "tensorboard"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    evaluated = [m["step"] for m in metrics if "eval/pass@4" in m]
    assert evaluated == [0, 2, 3], evaluated
    name = f"{root}/reward.py:even_chars"
    for m in metrics:
        if m["step"] in evaluated:
            assert m["eval/prompts"] == 5
            assert m["eval/pass@1"] == pytest.approx(m["eval/mean@4"], abs=1e-12)
            assert m["eval/mean@4"] <= m["eval/pass@2"] <= m["eval/pass@4"]
            assert {f"eval/{name}", "eval/format", "eval/reward"} <= set(m)
    assert "reward_mean" not in metrics[0] and "reward_mean" in metrics[1]
    assert "eval at step 0: scores over 5 prompts x 4 samples" in proc.stdout

    # the same engine and rewards: solver_generate on the initial model with the eval's sampling stream
    gen = str(root / "gen")
    proc = torchrun("solver_generate.py", ["--ckpt_dir", model, "--label_file", str(root / "eval.jsonl"),
                                           "--log_dir", gen, "--use_chat_template", "--dtype", "float32",
                                           "--max_seq_len", "160", "--max_new_tokens", "8", "--max_batch_size", "8",
                                           "--temperature", "1.0", "--num_samples_per_prompt", "4",
                                           "--seed", str(11 * 1_000_003 + EVAL_SEED), "--reward_funcs",
                                           f"{name},format"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(gen, "summary.json")) as f:
        summary = json.load(f)
    step0 = metrics[0]
    for key in ("reward", f"reward/{name}", "reward/format", "mean@4", "pass@1", "pass@2", "pass@4"):
        assert step0["eval/" + key.replace("reward/", "", 1)] == summary[key], key
    assert 0 < summary["mean@4"] < 1, "the deciding reward should split the samples"

    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/pass@4")] == [0, 2, 3]
    assert [e.step for e in acc.Scalars("reward_mean")] == [1, 2, 3]
    png = plot_run(out)
    assert os.path.getsize(png) > 10_000
    print(f"\nGRPO eval at steps {evaluated}: pass@1/pass@4 "
          f"{[(m['eval/pass@1'], m['eval/pass@4']) for m in metrics if 'eval/pass@4' in m]}; step 0 = "
          f"solver_generate summary exactly")


def test_grpo_eval_file_without_answers_fails_before_the_model_loads(setup, tmp_path):
    model, root = setup
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"instruction": "1+1?", "answer": "2"}\n{"instruction": "2+2?"}\n')
    results = launch_ranks("solver_grpo.py", grpo_args(model, root, str(tmp_path / "o"), "--reward_funcs",
                                                       "accuracy", "--eval_file", str(bad)), world=2)
    for rank, r in enumerate(results):
        assert r.returncode != 0, f"rank {rank} exited 0"
        assert f"[rank {rank}] error: {bad}:2: the accuracy reward needs the field 'answer'" in r.stderr, r.stderr
        assert "GRPO llama-hf" not in r.stdout, "the model was loaded before the eval file was checked"


def test_sft_tracks_sample_prompts(setup):
    from llama_rlhf.plot import plot_run
    model, root = setup
    prompts = root / "samples.jsonl"
    prompts.write_text('{"instruction": "What is 2 + 3?"}\n{"instruction": "Name a colour."}\n')
    train = root / "sft.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")) as f:
        train.write_text("".join(f.readlines()[:12]))
    out = str(root / "sft")
    proc = torchrun("solver_train.py", ["--ckpt_dir", model, "--train_file", str(train), "--save_dir", out,
                                        "--use_chat_template", "--max_seq_len", "128", "--max_batch_size", "4",
                                        "--lr", "3e-3", "--dtype", "float32", "--max_steps", "3",
                                        "--sample_prompts_file", str(prompts), "--sample_steps", "2",
                                        "--sample_max_new_tokens", "6"], nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    tracked = {m["step"]: m["samples"] for m in metrics if "samples" in m}
    assert sorted(tracked) == [0, 2, 3] and all(len(v) == 2 for v in tracked.values())
    assert "loss" not in metrics[0] and "loss" in metrics[1]
    assert "[sample 1 at step 3]" in proc.stdout
    gen = str(root / "sft_gen")
    proc = torchrun("solver_generate.py", ["--ckpt_dir", os.path.join(out, "checkpoint-3"), "--label_file",
                                           str(prompts), "--log_dir", gen, "--use_chat_template", "--dtype",
                                           "float32", "--max_seq_len", "128", "--max_new_tokens", "6"], nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(gen, "results.jsonl")) as f:
        greedy = [json.loads(line)["output"][0] for line in f]
    assert tracked[3] == greedy, (tracked[3], greedy)
    assert os.path.getsize(plot_run(out)) > 10_000
    print(f"\nSFT sample tracking: step 0 {tracked[0]} -> step 3 {tracked[3]} (= solver_generate on checkpoint-3)")
