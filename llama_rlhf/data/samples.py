"""One record -> token ids with shifted labels: loss on the response only (every assistant turn), truncation.

Labels are stored already shifted: ``labels[t]`` is the id that position t must predict, or -100. Packing,
padding and the sequence-parallel split then never have to think about the shift.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..jsonl import DataError
from ..parallel.cross_entropy import IGNORE_INDEX
from .formats import Record, to_record
from .readers import read_records


@dataclass
class Sample:
    ids: list[int]
    labels: list[int]  # shifted targets, IGNORE_INDEX where no loss

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class DatasetStats:
    samples: int = 0
    truncated: int = 0
    skipped_no_response: int = 0
    tokens: int = 0
    formats: dict = field(default_factory=dict)  # samples per detected format

    def add(self, other: "DatasetStats") -> None:
        for k, v in vars(other).items():
            if k == "formats":
                for f, n in v.items():
                    self.formats[f] = self.formats.get(f, 0) + n
            else:
                setattr(self, k, getattr(self, k) + v)

    def describe(self) -> str:
        kinds = ", ".join(f"{n} {f}" for f, n in sorted(self.formats.items()))
        return (f"{self.samples} samples ({kinds}), {self.tokens} tokens, {self.truncated} truncated, "
                f"{self.skipped_no_response} skipped (no response tokens left)")


def _chat_pieces(tok, messages: list[dict], system_prompt: str | None, where: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: assistant turns trained, the rest not.

    Each assistant turn is the difference between the rendering up to and including it and the rendering of
    everything before it with the generation header. If the template is not prefix-consistent (some drop
    earlier reasoning), only the last assistant turn is trained.
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    pieces, done = [], ""
    for i in turns:
        prompt = tok.render_chat(messages[:i], add_generation_prompt=True, system_prompt=system_prompt) if i else ""
        full = tok.render_chat(messages[:i + 1], add_generation_prompt=False, system_prompt=system_prompt)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            last = turns[-1]
            prompt = tok.render_chat(messages[:last], add_generation_prompt=True, system_prompt=system_prompt)
            full = tok.render_chat(messages[:last + 1], add_generation_prompt=False, system_prompt=system_prompt)
            if not full.startswith(prompt):
                raise DataError(f"{where}: the chat template renders the prompt differently inside the full "
                                f"conversation; cannot tell which tokens are the response")
            return [(prompt, False), (full[len(prompt):], True)]
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


def _tokenize_pieces(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids and per-token 'trained' flags; each trained turn ends at (and includes) an end token."""
    ids, trained = [], []
    for text, is_trained in pieces:
        if not text:
            continue
        part = tok.encode(text, add_bos=not ids and tok.adds_bos)
        flags = [is_trained] * len(part)
        if is_trained:
            ends = [j for j, t in enumerate(part) if t in tok.end_ids]
            if ends:  # text after the end token (a newline) is template glue, not response
                flags = [j <= ends[-1] for j in range(len(part))]
            else:
                part, flags = part + [tok.eos_id], flags + [True]
        ids += part
        trained += flags
    return ids, trained


def _plain_pieces(record: Record, where: str) -> list[tuple[str, bool]]:
    """Without a chat template: a string prompt/completion pair exactly as written; otherwise
    "system\n\ninstruction\n" as the prompt and the one assistant turn as the response."""
    if record.raw is not None:
        return [(record.raw[0], False), (record.raw[1], True)]
    turns = [m for m in record.messages if m["role"] != "system"]
    if len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
        raise DataError(f"{where}: multi-turn 'messages' need --use_chat_template true")
    system = "".join(m["content"] + "\n\n" for m in record.messages if m["role"] == "system")
    return [(system + turns[0]["content"] + "\n", False), (turns[1]["content"], True)]


def truncate(ids: list[int], trained: list[bool], max_len: int, bos_id) -> tuple[list[int], list[bool]]:
    """Fit into ``max_len``. One response span: cut the prompt from the left (its generation header, at the
    prompt's end, survives; BOS is kept), drop template glue after the response, then cut the response's tail.
    Several spans (multi-turn) or none: cut from the right."""
    if len(ids) <= max_len:
        return ids, trained
    spans = [i for i, t in enumerate(trained) if t]
    if spans and all(trained[spans[0]:spans[-1] + 1]):
        first, response = spans[0], spans[-1] + 1 - spans[0]
        keep_prompt = min(first, max(max_len - response, max_len // 2))
        head = 1 if keep_prompt and bos_id is not None and ids[0] == bos_id else 0
        prompt_ids = ids[:head] + ids[first - (keep_prompt - head):first] if keep_prompt else []
        out = prompt_ids + ids[first:first + min(response, max_len - len(prompt_ids))]
        return out, [False] * len(prompt_ids) + [True] * (len(out) - len(prompt_ids))
    return ids[:max_len], trained[:max_len]


def shift_labels(ids: list[int], trained: list[bool]) -> list[int]:
    """labels[t] = ids[t + 1] where token t + 1 is trained, else IGNORE_INDEX."""
    return [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def sample_arrays(obj: dict, tok, use_chat_template: bool, system_prompt: str | None, max_len: int,
                  where: str, stats: DatasetStats, fmt: str = "auto") -> tuple[list[int], list[int]] | None:
    """One record -> (token ids, shifted labels), or None (counted) when no response token survives truncation."""
    record = to_record(obj, fmt, where)
    if record.text is not None:
        ids = tok.encode(record.text, add_bos=tok.adds_bos) + [tok.eos_id]
        trained = [False] + [True] * (len(ids) - 1)
    else:
        if use_chat_template and record.raw is None:
            pieces = _chat_pieces(tok, record.messages, system_prompt, where)
        else:
            pieces = _plain_pieces(record, where)
        ids, trained = _tokenize_pieces(tok, pieces)
    if max_len and len(ids) > max_len:  # max_len None: never truncated (streamed pretraining)
        stats.truncated += 1
        ids, trained = truncate(ids, trained, max_len, tok.bos_id)
    labels = shift_labels(ids, trained)
    if all(t == IGNORE_INDEX for t in labels):
        stats.skipped_no_response += 1
        return None
    stats.samples += 1
    stats.tokens += len(ids)
    stats.formats[record.format] = stats.formats.get(record.format, 0) + 1
    return ids, labels


def build_sample(obj: dict, tok, use_chat_template: bool, system_prompt: str | None, max_len: int,
                 where: str, stats: DatasetStats, fmt: str = "auto") -> Sample | None:
    """One record -> a Sample, or None (counted) when no response token survives truncation."""
    arrays = sample_arrays(obj, tok, use_chat_template, system_prompt, max_len, where, stats, fmt)
    return None if arrays is None else Sample(*arrays)


def load_samples(path: str, tok, use_chat_template: bool, system_prompt: str | None,
                 max_len: int, fmt: str = "auto") -> tuple[list[Sample], DatasetStats]:
    """Every record of a file as a Sample in memory (small files, tests); training maps the token cache instead."""
    stats = DatasetStats()
    samples = []
    for where, obj in read_records(path):
        sample = build_sample(obj, tok, use_chat_template, system_prompt, max_len, where, stats, fmt)
        if sample is not None:
            samples.append(sample)
    check_not_empty(path, stats)
    return samples, stats


def check_not_empty(path: str, stats: DatasetStats) -> None:
    if not stats.samples:
        why = f" ({stats.skipped_no_response} had no response tokens left after truncation)" \
            if stats.skipped_no_response else ""
        raise DataError(f"{path}: no usable training samples{why}")
