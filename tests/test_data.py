"""Data path: loss masks on rendered chats, truncation, packing, the deterministic DP-sharded schedule, flags."""
import json

import pytest

from llama_rlhf.cli import str2bool
from llama_rlhf.data import DatasetStats, StepBatches, build_sample, collate, load_samples, pack
from llama_rlhf.jsonl import DataError
from llama_rlhf.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def trained_text(tok, sample):
    """The text of the tokens that carry a loss (labels are shifted: label t is token t + 1)."""
    return tok.decode([t for t in sample.labels if t != -100], skip_special_tokens=False)


def test_labels_cover_exactly_the_response_and_its_end_token(tok):
    obj = {"instruction": "What is 2 + 2?", "output": "It is 4."}
    sample = build_sample(obj, tok, True, None, 512, "x:1", DatasetStats())
    prompt = tok.render_chat([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True)
    prompt_ids = tok.encode(prompt)
    assert sample.ids[:len(prompt_ids)] == prompt_ids
    assert trained_text(tok, sample) == "It is 4.<|im_end|>"
    # every label is the next token where trained and -100 everywhere else (prompt, trailing newline)
    n = len(prompt_ids)
    for t, label in enumerate(sample.labels):
        trained = n - 1 <= t < n - 1 + len(tok.encode("It is 4.<|im_end|>"))
        assert label == (sample.ids[t + 1] if trained else -100), f"position {t}"
    # padding in a batch carries no loss
    batch = collate(pack([sample], 512, False) + [None], tok.pad_id, multiple=8)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert (batch["labels"][1] == -100).all() and (batch["labels"][0, len(sample.ids):] == -100).all()


def test_every_assistant_turn_is_trained_in_multi_turn_chats(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    sample = build_sample({"messages": messages}, tok, True, None, 512, "x:1", DatasetStats())
    assert trained_text(tok, sample) == "Hello!<|im_end|>4<|im_end|>"
    assert tok.decode(sample.ids, skip_special_tokens=False) == tok.render_chat(messages, add_generation_prompt=False)


def test_system_prompt_flag_and_plain_format(tok):
    obj = {"instruction": "Q", "output": "A"}
    with_system = build_sample(obj, tok, True, "You are terse.", 512, "x:1", DatasetStats())
    assert "You are terse." in tok.decode(with_system.ids, skip_special_tokens=False)
    plain = build_sample({**obj, "system": "S"}, tok, False, None, 512, "x:1", DatasetStats())
    assert tok.decode(plain.ids, skip_special_tokens=False).startswith("S\n\nQ\n")
    assert trained_text(tok, plain) == "A" + tok.decode([tok.eos_id], skip_special_tokens=False)


def test_pretraining_text_trains_every_token(tok):
    sample = build_sample({"text": "one two three"}, tok, False, None, 512, "x:1", DatasetStats())
    assert sample.ids[-1] == tok.eos_id
    assert sample.labels[:-1] == sample.ids[1:] and sample.labels[-1] == -100


def test_bad_lines_name_file_and_line(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    for content, fragment in [('{"instruction": "a", "output": "b"}\n[1, 2]\n', ":2: expected a JSON object"),
                              ('{"instruction": "a"}\n', ":1: expected 'instruction' and 'output'"),
                              ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: 'messages' has no assistant"),
                              ('\n\n{"text": 5}\n', ":3: 'text' must be a string")]:
        path.write_text(content)
        with pytest.raises(DataError, match=fragment):
            load_samples(str(path), tok, True, None, 64)


def test_packing_resets_positions_and_separates_documents(tok):
    samples = [build_sample({"text": t}, tok, False, None, 64, "x", DatasetStats()) for t in ["a b", "c d e", "f"]]
    rows = pack(samples, 64, True)
    assert len(rows) == 1
    row = rows[0]
    lengths = [len(s.ids) for s in samples]
    assert row.positions == [i for n in lengths for i in range(n)]
    assert row.segments == [k for k, n in enumerate(lengths) for _ in range(n)]
    # no label crosses a document boundary: each document's last token predicts nothing
    ends = [sum(lengths[:k + 1]) - 1 for k in range(3)]
    assert all(row.labels[e] == -100 for e in ends)


def test_schedule_is_deterministic_and_independent_of_the_split():
    from llama_rlhf.data import Row
    rows = [Row([i, i + 1], [i + 1, -100], [0, 1], [0, 0]) for i in range(10)]
    a = StepBatches(rows, 2, 2, 1, seed=7)  # 2 rows x 2 DP ranks
    b = StepBatches(rows, 1, 1, 4, seed=7)  # 1 row x 4 accumulation steps
    assert a.steps_per_epoch == b.steps_per_epoch == 3
    for step in range(3):
        rows_a = [r for d in range(2) for m in a.micro_batches(0, step, d)[0] for r in m]
        rows_b = [r for m in b.micro_batches(0, step, 0)[0] for r in m]
        assert sorted(id(r) for r in rows_a) == sorted(id(r) for r in rows_b)
        assert a.micro_batches(0, step, 0)[1] == b.micro_batches(0, step, 0)[1]
    # every row once per epoch; the last step is topped up with empty rows; epochs reshuffle
    seen = [r for s in range(3) for r in a.step_rows(0, s)]
    assert sum(r is None for r in seen) == 2 and len({id(r) for r in seen if r is not None}) == 10
    from llama_rlhf.data import epoch_order
    assert epoch_order(10, 7, 0) != epoch_order(10, 7, 1) and epoch_order(10, 7, 0) == epoch_order(10, 7, 0)


def test_boolean_flags_parse_true_and_false():
    assert str2bool("False") is False and str2bool("false") is False and str2bool("0") is False
    assert str2bool("True") is True and str2bool("yes") is True
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")
    from solver_train import parse_args
    args = parse_args(["--train_file", "x", "--save_dir", "y", "--packing", "False", "--use_chat_template",
                       "--resume", "true"])
    assert args.packing is False and args.use_chat_template is True and args.resume is True


def test_jsonl_roundtrip(tmp_path):
    from llama_rlhf.jsonl import read_jsonl, write_jsonl_atomic
    path = str(tmp_path / "x.jsonl")
    write_jsonl_atomic(path, [{"a": 1}, {"b": "ü"}])
    assert [o for _, o in read_jsonl(path)] == [{"a": 1}, {"b": "ü"}]
    assert json.loads(open(path, encoding="utf-8").readline()) == {"a": 1}
