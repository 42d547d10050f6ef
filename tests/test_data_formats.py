"""Data formats and readers: every shape gives the ids and labels of the equivalent messages line; every reader gives
the jsonl reader's records (also split into rank shares); bad input is one line naming file and line (or row)."""
import json

import pytest

from llama_rlhf.data import DatasetStats, load_samples, read_records, sample_arrays
from llama_rlhf.jsonl import DataError
from llama_rlhf.tokenizer import load_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3.\n2 3"},
        {"role": "assistant", "content": "5"}]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def arrays(tok, obj, chat=True, fmt="auto"):
    return sample_arrays(obj, tok, chat, None, 512, "x:1", DatasetStats(), fmt)


def test_every_format_equals_its_messages_line(tok):
    reference = arrays(tok, {"messages": CHAT})
    # the hand-built reference: the rendered prompt untrained, the rendered answer through <|im_end|> trained
    prompt = tok.encode(tok.render_chat(CHAT[:2], add_generation_prompt=True))
    full = tok.encode(tok.render_chat(CHAT, add_generation_prompt=False))
    ids, labels = reference
    assert ids == full and ids[:len(prompt)] == prompt
    answer = tok.encode("5<|im_end|>")
    assert labels == [-100] * (len(prompt) - 1) + answer + [-100] * (len(ids) - len(prompt) - len(answer) + 1)
    same = {
        "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                       {"from": "human", "value": "Add 2 and 3.\n2 3"}, {"from": "gpt", "value": "5"}]},
        "alpaca": {"instruction": "Add 2 and 3.", "input": "2 3", "output": "5", "system": "Be brief."},
        "alpaca, instruction as a list": {"instruction": ["Add 2 and 3.", "2 3"], "output": "5", "system": "Be brief."},
        "prompt/completion lists": {"prompt": CHAT[:2], "completion": CHAT[2:]},
    }
    for name, obj in same.items():
        assert arrays(tok, obj) == reference, name
        fmt = {"sharegpt": "sharegpt", "prompt/completion lists": "prompt_completion"}.get(name, "alpaca")
        assert arrays(tok, obj, fmt=fmt) == reference, f"{name} with --data_format {fmt}"
    # a string prompt/completion (TRL's standard format) is continued exactly as written: no template, no newline
    strings = {"prompt": "Add 2 and 3.\n2 3", "completion": "5"}
    ids, labels = arrays(tok, strings, chat=True)
    assert (ids, labels) == arrays(tok, strings, chat=False)
    p, c = tok.encode("Add 2 and 3.\n2 3", add_bos=tok.adds_bos), tok.encode("5") + [tok.eos_id]
    assert ids == p + c and labels == [-100] * (len(p) - 1) + c + [-100]
    # ... and an alpaca line is "system\n\ninstruction\ninput\n" then the output
    ids, _ = arrays(tok, same["alpaca"], chat=False)
    assert tok.decode(ids, skip_special_tokens=False) == "Be brief.\n\nAdd 2 and 3.\n2 3\n5" + \
        tok.decode([tok.eos_id], skip_special_tokens=False)
    text_ids, text_labels = arrays(tok, {"text": "one two"}, fmt="text")
    assert text_labels[:-1] == text_ids[1:]


RECORDS = [{"messages": [{"role": "user", "content": f"q{i} ü"}, {"role": "assistant", "content": f"a{i}"}]}
           for i in range(7)]


def write_all(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json", "parquet": tmp_path / "d.parquet",
             "datasets": tmp_path / "d_folder"}
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    paths["json"].write_text(json.dumps(RECORDS, indent=1, ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(RECORDS), paths["parquet"], row_group_size=3)
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(paths["datasets"]))
    return {k: str(v) for k, v in paths.items()}


def test_readers_agree_and_split_into_shares(tmp_path, tok):
    paths = write_all(tmp_path)
    for kind, path in paths.items():
        got = [obj for _, obj in read_records(path)]
        assert got == RECORDS, kind
        for world in (2, 3):
            shares = [obj for r in range(world) for _, obj in read_records(path, (r, world))]
            assert shares == RECORDS, f"{kind} split over {world} ranks"
        samples, _ = load_samples(path, tok, True, None, 64)
        assert [s.ids for s in samples] == [s.ids for s in load_samples(paths["jsonl"], tok, True, None, 64)[0]]
    starts = [i + 1 for i, line in enumerate(open(paths["json"]).read().splitlines()) if line == " {"]
    assert [w for w, _ in read_records(paths["json"])] == [f"{paths['json']}:{n}" for n in starts]
    assert [w for w, _ in read_records(paths["parquet"])][4] == f"{paths['parquet']}: row 4"


def test_bad_input_names_file_and_line(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "bad.jsonl"
    cases = [(b'{"text": "ok"}\n{"text": "\xff"}\n', r":2: not valid UTF-8 \(byte 25 of the file, column 11\)"),
             (b'{"text": "ok"}\n{"text": \n', ":2: not valid JSON"),
             (b'{"question": "q", "answer": "a"}\n', r":1: unknown record shape \(keys \['answer', 'question'\]\)"),
             (b'{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}\n',
              r":1: conversations\[1\] has unknown 'from' 'bot'"),
             (b'{"prompt": "q"}\n', ":1: unknown record shape")]
    for content, fragment in cases:
        path.write_bytes(content)
        with pytest.raises(DataError, match=f"^{path}{fragment}"):
            load_samples(str(path), tok, True, None, 64)
    table = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), table)
    with pytest.raises(DataError, match=r"bad.parquet: columns \['question'\] have none of the needed"):
        load_samples(str(table), tok, True, None, 64)
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}]), table)
    with pytest.raises(DataError, match="bad.parquet: row 1: 'text' must be a string"):
        load_samples(str(table), tok, True, None, 64)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]')
    with pytest.raises(DataError, match="bad.json:3: not valid JSON"):
        load_samples(str(bad_json), tok, True, None, 64)


def test_prompts_of_every_format_render_like_their_messages_line(tok):
    """solver_generate / GRPO prompts: the reference (trailing assistant, completion, output) is not prompted."""
    from llama_rlhf.inference.batch_generate import prompt_ids
    reference = prompt_ids({"messages": CHAT}, tok, True, None, "x:1")
    assert reference == tok.encode_chat(CHAT[:2], add_generation_prompt=True)
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Add 2 and 3.\n2 3"},
             {"from": "gpt", "value": "5"}]
    for obj in ({"conversations": turns},
                {"instruction": "Add 2 and 3.", "input": "2 3", "output": "5", "system": "Be brief."},
                {"prompt": CHAT[:2], "completion": CHAT[2:]}):
        assert prompt_ids(obj, tok, True, None, "x:1") == reference, obj
    raw = prompt_ids({"prompt": "Add 2 and 3.", "completion": "5"}, tok, True, None, "x:1")
    assert raw == tok.encode("Add 2 and 3.", add_bos=tok.adds_bos)  # as written: no template, no newline
