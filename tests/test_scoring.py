"""Scoring: pass@k / mean@n / maj@n against hand-computed values and brute-force enumeration, and solver_generate
scoring end to end on a tiny model (summary.json = the means of the per-line rewards, user reward functions),
with its bad input refused before any model is loaded."""
import itertools
import json
import os
import time

import pytest

from llama_rlhf.rewards import build_rewards, check_required_fields
from llama_rlhf.jsonl import DataError
from llama_rlhf.runtime import UsageError
from llama_rlhf.inference.scoring import default_pass_k, majority_vote, parse_pass_k, pass_at_k, summarize
from tests.hf_reference import write_tiny_chat_model
from tests.launch import launch_ranks, torchrun


def brute_pass_at_k(flags, k):
    """Fraction of all k-subsets of the samples holding at least one correct one."""
    subsets = list(itertools.combinations(flags, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # 1 - C(3,1)/C(4,1)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(8, 2, 4) == pytest.approx(55 / 70)  # 1 - C(6,4)/C(8,4) = 1 - 15/70
    # n = k: pass@n is "any sample correct"
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0 and pass_at_k(1, 1, 1) == 1.0
    # all correct, none correct
    assert [pass_at_k(8, 8, k) for k in (1, 4, 8)] == [1.0, 1.0, 1.0]
    assert [pass_at_k(8, 0, k) for k in (1, 4, 8)] == [0.0, 0.0, 0.0]
    for n in range(1, 7):
        for c in range(n + 1):
            flags = [True] * c + [False] * (n - c)
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 = mean@n
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(flags, k), abs=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_by_hand():
    assert majority_vote(["3", "3", "4"], "3") == 1.0
    assert majority_vote(["4", "4", "3"], 3) == 0.0
    assert majority_vote(["3", "4"], "3") == 0.5  # a tie of two values: one of them right
    assert majority_vote(["1", "2", "3"], "2") == pytest.approx(1 / 3)  # three-way tie
    assert majority_vote(["5", "6", "7", "7", "5"], "9") == 0.0  # tie, neither right
    assert majority_vote(["1,000", "1000.0", "7", None, "abc"], "1000") == 1.0  # equal numbers vote together
    assert majority_vote([None, "x", "4", "4", "3", "3", "3"], "3") == 1.0  # text answers do not vote
    assert majority_vote([None, "abc"], "3") == 0.0  # no numeric answer
    assert majority_vote(["3"], "three") is None  # reference not numeric: no maj@n for this prompt
    assert majority_vote(["3/4", "0.75", "1"], "0.75") == 1.0


def test_pass_k_flag():
    assert parse_pass_k("8,1,4", 8) == [1, 4, 8]
    assert default_pass_k(8) == [1, 2, 4, 8] and default_pass_k(6) == [1, 2, 4, 6] and default_pass_k(1) == [1]
    with pytest.raises(UsageError, match="--pass_k 8 is larger than --num_samples_per_prompt 4"):
        parse_pass_k("1,8", 4)
    with pytest.raises(UsageError, match="--pass_k 'a': expected a comma list"):
        parse_pass_k("a", 4)
    with pytest.raises(UsageError, match="every k must be >= 1"):
        parse_pass_k("0,2", 4)


def test_summarize_by_hand():
    rows = [
        {"answer": "3", "predicted_answer": ["3", "4", "3"], "reward": [1.5, 0.5, 1.0],
         "rewards": {"accuracy": [1.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0]}},
        {"answer": "7", "predicted_answer": ["6", None, "5"], "reward": [0.0, 0.5, 0.0],
         "rewards": {"accuracy": [0.0, 0.0, 0.0], "format": [0.0, 1.0, 0.0]}},
        {"answer": "x", "predicted_answer": ["x", "x", "x"], "reward": [1.0, 1.0, 1.0],
         "rewards": {"accuracy": [1.0, 1.0, 1.0], "format": [0.0, 0.0, 0.0]}},
    ]
    s = summarize(rows, ["accuracy", "format"], [1, 2, 3])
    assert s["prompts"] == 3 and s["samples_per_prompt"] == 3 and s["correct_by"] == "accuracy"
    assert s["reward"] == pytest.approx((3.0 + 0.5 + 3.0) / 9)
    assert s["reward/accuracy"] == pytest.approx(5 / 9) and s["reward/format"] == pytest.approx(3 / 9)
    assert s["mean@3"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert s["pass@1"] == pytest.approx(s["mean@3"])
    assert s["pass@2"] == pytest.approx((1.0 + 0 + 1) / 3)  # 2 of 3 correct: every pair holds one
    assert s["pass@3"] == pytest.approx(2 / 3)
    # maj@3: prompt 1 votes 3 (right), prompt 2 ties 6/5 (both wrong), prompt 3's answer is not a number
    assert s["maj@3"] == pytest.approx(0.5) and s["maj_prompts"] == 2
    without_accuracy = summarize(rows, ["format"], [1])
    assert without_accuracy["correct_by"] == "format" and "maj@3" not in without_accuracy
    assert without_accuracy["pass@1"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)


def test_required_fields(tmp_path):
    rewards = build_rewards("format,accuracy", None)
    check_required_fields(rewards, [("f.jsonl:1", {"answer": "1"})])
    with pytest.raises(DataError, match="f.jsonl:4: the accuracy reward needs the field 'answer'"):
        check_required_fields(rewards, [("f.jsonl:1", {"answer": "1"}), ("f.jsonl:4", {"instruction": "q"})])
    user = tmp_path / "needs.py"
    user.write_text("def r(completion, sample):\n    return 1.0\nr.required_fields = ('label',)\n")
    with pytest.raises(DataError, match=f"f.jsonl:1: the {user}:r reward needs the field 'label'"):
        check_required_fields(build_rewards(f"{user}:r", None), [("f.jsonl:1", {"answer": "1"})])


# ---- solver_generate end to end -------------------------------------------------------------------------------

LINES = [{"instruction": f"What is {a} + {b}?", "answer": str(a + b), "id": i}
         for i, (a, b) in enumerate([(2, 3), (10, 7), (4, 4), (1, 8), (6, 5)])]
USER_REWARD = """
def even_length(completion, sample):
    return 1.0 if sample["completion_tokens"] % 2 == 0 else 0.0

def even_chars(completion, sample):
    return 1.0 if len(completion) % 2 == 0 else 0.0

def chars(completion, sample):
    return len(completion) / 100.0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("scoring")
    model = write_tiny_chat_model(str(root / "model"), smollm2_dir, seed=3, initializer_range=0.3)
    data = root / "q.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    user = root / "my_rewards.py"
    user.write_text(USER_REWARD)
    return model, str(data), str(user), root


def solver_args(model, data, log_dir, *extra):
    return ["--ckpt_dir", model, "--model_type", "llama-hf", "--label_file", data, "--log_dir", log_dir,
            "--use_chat_template", "--dtype", "float32", "--max_seq_len", "64", "--max_new_tokens", "8",
            "--max_batch_size", "4", "--seed", "5", "--temperature", "1.0", *extra]


def read_results(log_dir):
    with open(os.path.join(log_dir, "results.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(log_dir, "summary.json")) as f:
        return rows, json.load(f)


def test_generate_scores_every_sample(setup):
    model, data, user, root = setup
    log_dir = str(root / "run")
    spec = f"{user}:even_length,accuracy,{user}:chars"
    proc = torchrun("solver_generate.py", solver_args(model, data, log_dir, "--num_samples_per_prompt", "4",
                                                      "--reward_funcs", spec, "--reward_weights", "1,2,0.5",
                                                      "--pass_k", "1,2,4"), nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, summary = read_results(log_dir)
    names = [f"{user}:even_length", "accuracy", f"{user}:chars"]
    n = 4
    for row in rows:
        assert list(row["rewards"]) == names and all(len(v) == n for v in row["rewards"].values())
        for s in range(n):  # each value recomputed from the sample itself
            assert row["rewards"][names[0]][s] == (1.0 if row["num_output_tokens"][s] % 2 == 0 else 0.0)
            assert row["rewards"][names[2]][s] == pytest.approx(len(row["output"][s]) / 100.0)
            assert row["reward"][s] == pytest.approx(row["rewards"][names[0]][s] + 2 * row["rewards"]["accuracy"][s]
                                                     + 0.5 * row["rewards"][names[2]][s])
        assert len(row["predicted_answer"]) == n
    # summary.json = the means of the per-line values
    total = len(rows) * n
    assert summary["prompts"] == 5 and summary["samples_per_prompt"] == n
    assert summary["reward"] == pytest.approx(sum(sum(r["reward"]) for r in rows) / total, abs=1e-12)
    for name in names:
        assert summary[f"reward/{name}"] == pytest.approx(sum(sum(r["rewards"][name]) for r in rows) / total,
                                                          abs=1e-12)
    flags = [[v >= 1 for v in r["rewards"]["accuracy"]] for r in rows]
    assert summary["correct_by"] == "accuracy"
    assert summary[f"mean@{n}"] == pytest.approx(sum(sum(f) for f in flags) / total, abs=1e-12)
    for k in (1, 2, 4):
        assert summary[f"pass@{k}"] == pytest.approx(sum(brute_pass_at_k(f, k) for f in flags) / len(rows),
                                                     abs=1e-12)
    assert summary["maj_prompts"] == 5 and 0.0 <= summary[f"maj@{n}"] <= 1.0
    assert "pass@4" in proc.stdout and "scores over 5 prompts x 4 samples (correct: accuracy >= 1)" in proc.stdout
    print(f"\nsolver_generate scoring (DP=2, 5 prompts x 4 samples): {json.dumps(summary)}")

    # a user function deciding correctness (no accuracy): pass@k from its values, on one rank
    log_dir = str(root / "user")
    proc = torchrun("solver_generate.py", solver_args(model, data, log_dir, "--num_samples_per_prompt", "3",
                                                      "--reward_funcs", f"{user}:even_chars,format"),
                    nproc=1, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, summary = read_results(log_dir)
    flags = [[v >= 1 for v in r["rewards"][f"{user}:even_chars"]] for r in rows]
    assert summary["correct_by"] == f"{user}:even_chars" and "maj@3" not in summary
    assert 0 < sum(map(sum, flags)) < 15, "the user reward should split the samples (else pass@k is untested)"
    for k in (1, 2, 3):
        assert summary[f"pass@{k}"] == pytest.approx(sum(brute_pass_at_k(f, k) for f in flags) / len(rows),
                                                     abs=1e-12)
    assert all("predicted_answer" not in r for r in rows)


def expect_failure_everywhere(args, *fragments):
    start = time.time()
    results = launch_ranks("solver_generate.py", args, world=2, timeout=120)
    assert time.time() - start < 60
    for rank, r in enumerate(results):
        assert r.returncode != 0 and f"[rank {rank}] error:" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
        for fragment in fragments:
            assert fragment in r.stderr, f"rank {rank}: {fragment!r} not in:\n{r.stderr[-2000:]}"


def test_bad_input_before_any_model_loads(setup, tmp_path):
    _, data, _, _ = setup
    missing_model = str(tmp_path / "no_model")  # any model load would fail with "--ckpt_dir ... does not exist"
    expect_failure_everywhere(solver_args(missing_model, data, str(tmp_path / "o"), "--num_samples_per_prompt", "4",
                                          "--reward_funcs", "accuracy", "--pass_k", "1,8"),
                              "--pass_k 8 is larger than --num_samples_per_prompt 4")
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text('{"instruction": "1+1?", "answer": "2"}\n{"instruction": "2+2?"}\n')
    expect_failure_everywhere(solver_args(missing_model, str(no_answers), str(tmp_path / "o"),
                                          "--reward_funcs", "format,accuracy"),
                              f"{no_answers}:2: the accuracy reward needs the field 'answer'")
    from solver_generate import parse_args
    with pytest.raises(UsageError, match="--pass_k needs --reward_funcs"):
        parse_args(solver_args(missing_model, data, "o", "--pass_k", "1"))
