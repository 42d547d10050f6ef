"""solver_generate.py end to end, launched like users launch it (torchrun), on a tiny random chat model.

- Greedy: the DP=2 x MP=1 results file equals the DP=1 file byte for byte (5 prompts: DP does not divide them),
  in input order, with fields carried through, token counts, finish reasons and the left-cut prompt counted.
- Sampling: DP=2 x MP=1 equals DP=1 x MP=2 and SP=2 (whole sequences on each SP rank) byte for byte: random
  streams are keyed by prompt, not by rank.
- Bad input fails on every rank, non-zero, within seconds, with a message naming what to fix.
"""
import json
import os
import time

import pytest

from tests.hf_reference import write_tiny_chat_model
from tests.launch import launch_ranks, torchrun

LONG = "Please summarise this. " + "The quick brown fox jumps over the lazy dog. " * 20
LINES = [
    {"instruction": "What is 2+2?", "id": "a"},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}], "id": "b"},
    {"instruction": "Name a colour.", "output": "red", "id": "c", "meta": {"k": [1, 2]}},
    {"instruction": LONG, "id": "d"},
    {"instruction": "Count to three.", "system": "You are terse.", "id": "e"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_dir):
    # weights large enough that each prompt gets its own continuation (so a mixed-up order would show)
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_gen_model")), smollm2_dir, seed=3,
                                 initializer_range=0.3)


@pytest.fixture(scope="module")
def label_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen_data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    return str(path)


def solver_args(model_dir, label_file, log_dir, *extra):
    return ["--ckpt_dir", model_dir, "--model_type", "llama-hf", "--label_file", label_file, "--log_dir", log_dir,
            "--use_chat_template", "--dtype", "float32", "--max_seq_len", "64", "--max_new_tokens", "8",
            "--max_batch_size", "3", "--num_samples_per_prompt", "2", "--seed", "7", *extra]


def run_solver(nproc, args) -> tuple[str, str]:
    proc = torchrun("solver_generate.py", args, nproc=nproc, timeout=240)
    assert proc.returncode == 0, f"solver_generate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    log_dir = args[args.index("--log_dir") + 1]
    with open(os.path.join(log_dir, "results.jsonl")) as f:
        return f.read(), proc.stdout


def test_greedy_dp2_file_equals_dp1(model_dir, label_file, tmp_path):
    one, log_one = run_solver(1, solver_args(model_dir, label_file, str(tmp_path / "dp1"), "--temperature", "0"))
    two, log_two = run_solver(2, solver_args(model_dir, label_file, str(tmp_path / "dp2"), "--temperature", "0"))
    assert one == two, "DP=2 results differ from DP=1"
    rows = [json.loads(line) for line in one.splitlines()]
    assert [r["id"] for r in rows] == [line["id"] for line in LINES], "results are not in input order"
    for row, line in zip(rows, LINES):
        for key, value in line.items():
            if key != "output":
                assert row[key] == value, f"field {key} not carried through"
        assert len(row["output"]) == 2 and row["output"][0] == row["output"][1], "greedy samples must agree"
        assert len(row["num_output_tokens"]) == 2 and all(1 <= n <= 8 for n in row["num_output_tokens"])
        assert set(row["finish_reason"]) <= {"stop", "length"}
        assert row["num_prompt_tokens"] + max(row["num_output_tokens"]) <= 64
    assert len({r["output"][0] for r in rows}) == len(rows), "prompts share a continuation: order is untested"
    assert rows[2]["reference_output"] == "red"
    cut = rows[3]
    assert cut["num_prompt_tokens"] == 63 and cut["prompt_tokens_cut"] > 100, cut
    assert cut["num_output_tokens"] == [1, 1] and cut["finish_reason"] == ["length", "length"]
    assert all("prompt_tokens_cut" not in r for i, r in enumerate(rows) if i != 3)
    for log in (log_one, log_two):
        assert "5 prompts, 1 cut from the left to fit --max_seq_len 64 (lines 4)" in log, log
        assert "prompts done" in log and "tokens/s" in log, log
    assert "MP=1 x 2 replicas" in log_two


def test_sampled_dp2_file_equals_mp2(model_dir, label_file, tmp_path):
    sampling = ["--temperature", "1.0", "--top_p", "0.95"]
    dp, _ = run_solver(2, solver_args(model_dir, label_file, str(tmp_path / "dp2"), *sampling))
    mp, log = run_solver(2, solver_args(model_dir, label_file, str(tmp_path / "mp2"), *sampling,
                                        "--model_parallel_size", "2"))
    assert "MP=2 x 1 replicas" in log
    assert dp == mp, "sampled results depend on the layout"
    sp, _ = run_solver(2, solver_args(model_dir, label_file, str(tmp_path / "sp2"), *sampling,
                                      "--sequence_parallel_size", "2"))  # SP ranks generate as replicas
    assert sp == dp, "SP=2 results differ from DP=2"
    rows = [json.loads(line) for line in dp.splitlines()]
    assert all(r["output"][0] != r["output"][1] for r in rows if r["id"] != "d"), "a prompt's two samples agree"


def expect_failure_everywhere(results, seconds, *fragments):
    assert seconds < 90, f"the ranks took {seconds:.0f}s to fail"
    for rank, r in enumerate(results):
        assert r.returncode != 0, f"rank {rank} exited 0"
        assert f"[rank {rank}] error:" in r.stderr, f"rank {rank}:\n{r.stderr[-2000:]}"
        for fragment in fragments:
            assert fragment in r.stderr, f"rank {rank}: {fragment!r} not in:\n{r.stderr[-2000:]}"


def launch(args, world):
    start = time.time()
    results = launch_ranks("solver_generate.py", args, world=world, timeout=120)
    return results, time.time() - start


def test_malformed_line_names_file_and_line(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n\n{"instruction": "b", \n')
    expect_failure_everywhere(*launch(solver_args(model_dir, str(bad), str(tmp_path / "o")), 2),
                              f"{bad}:3", "not valid JSON")
    bad.write_text('{"instruction": "a"}\n{"question": "b"}\n')
    expect_failure_everywhere(*launch(solver_args(model_dir, str(bad), str(tmp_path / "o")), 2),
                              f"{bad}:2", "expected an 'instruction' string or a 'messages' list")


def test_strict_refuses_a_prompt_that_does_not_fit(model_dir, label_file, tmp_path):
    results, seconds = launch(solver_args(model_dir, label_file, str(tmp_path / "o"), "--strict"), 2)
    expect_failure_everywhere(results, seconds, f"{label_file}:4: the prompt has", "--max_seq_len 64",
                              "drop --strict")


def test_missing_checkpoint_dir(label_file, tmp_path):
    missing = str(tmp_path / "no_such_model")
    expect_failure_everywhere(*launch(solver_args(missing, label_file, str(tmp_path / "o")), 2),
                              f"--ckpt_dir {missing} does not exist")


def test_model_parallel_must_divide_heads(model_dir, label_file, tmp_path):
    args = solver_args(model_dir, label_file, str(tmp_path / "o"), "--model_parallel_size", "3")
    expect_failure_everywhere(*launch(args, 3), "num_attention_heads 4 is not divisible by --model_parallel_size 3")


def test_prompts_render_like_training(smollm2_dir, tmp_path):
    """Chat template vs plain "system\\n\\nuser\\n" rendering, reference answers dropped, left cut keeps BOS."""
    from llama_rlhf.inference.batch_generate import fit_prompt, prompt_ids, read_prompts
    from llama_rlhf.jsonl import DataError
    from llama_rlhf.tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_dir, model_type="llama-hf")
    user = [{"role": "user", "content": "Hi"}]
    chat = prompt_ids({"messages": user + [{"role": "assistant", "content": "ref"}]}, tok, True, None, "f:1")
    assert chat == tok.encode_chat(user, add_generation_prompt=True)
    assert prompt_ids({"instruction": "Hi"}, tok, True, None, "f:1") == chat
    system = [{"role": "system", "content": "Be brief."}] + user
    assert prompt_ids({"instruction": "Hi", "system": "Be brief."}, tok, True, None, "f:1") == \
        tok.encode_chat(system, add_generation_prompt=True)
    assert prompt_ids({"instruction": "Hi"}, tok, True, "Be brief.", "f:1") == \
        tok.encode_chat(system, add_generation_prompt=True)
    assert prompt_ids({"instruction": "Hi", "system": "Be brief."}, tok, False, None, "f:1") == \
        tok.encode("Be brief.\n\nHi\n", add_bos=tok.adds_bos)
    with pytest.raises(DataError, match="f:7: multi-turn 'messages' need --use_chat_template true"):
        prompt_ids({"messages": user + [{"role": "assistant", "content": "a"}] + user}, tok, False, None, "f:7")
    with pytest.raises(DataError, match="f:2: 'messages' has no user turn"):
        prompt_ids({"messages": [{"role": "assistant", "content": "a"}]}, tok, True, None, "f:2")
    assert fit_prompt([1, 5, 6, 7, 8, 9], 4, bos_id=1) == ([1, 8, 9], 3)
    assert fit_prompt([5, 6, 7, 8, 9], 4, bos_id=1) == ([7, 8, 9], 2)
    assert fit_prompt([5, 6, 7], 4, bos_id=1) == ([5, 6, 7], 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(str(empty), tok, True, None, 64, False)


def test_raw_prompt_from_parquet_is_continued_as_written_like_transformers(model_dir, tmp_path):
    """{"prompt": str} lines (here a parquet file): no template, nothing appended; greedy equals transformers'."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    texts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": t, "id": i} for i, t in enumerate(texts)]), path)
    out, _ = run_solver(1, solver_args(model_dir, str(path), str(tmp_path / "raw"), "--temperature", "0",
                                       "--num_samples_per_prompt", "1"))
    rows = [json.loads(line) for line in out.splitlines()]
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for row, text in zip(rows, texts):
        ids = hf_tok(text, return_tensors="pt").input_ids
        assert row["num_prompt_tokens"] == ids.shape[1], (row, text)
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
        new = ref[0, ids.shape[1]:].tolist()
        assert row["num_output_tokens"] == [len(new)], (row, new)
        assert row["output"] == [hf_tok.decode(new, skip_special_tokens=True)], (row, text)
