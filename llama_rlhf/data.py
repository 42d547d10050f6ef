"""Training data: jsonl -> token ids with shifted labels, optional packing, deterministic DP-sharded batches.

Formats (one JSON object per line):
  {"instruction": ..., "output": ..., "system": optional}   one prompt, one response
  {"messages": [{"role": ..., "content": ...}, ...]}        multi-turn; loss on every assistant turn
  {"text": ...}                                            pretraining; loss on every token

Labels are stored already shifted: ``labels[t]`` is the id that position t must predict, or -100. Packing,
padding and the sequence-parallel split then never have to think about the shift.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .jsonl import DataError, read_jsonl
from .parallel.cross_entropy import IGNORE_INDEX


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


def _messages_of(obj: dict, where: str) -> list[dict]:
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: every message needs string 'role' and 'content' fields")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant turn to train on")
        return messages
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            raise DataError(f"{where}: expected 'instruction' and 'output' strings, 'messages', or 'text' "
                            f"(missing or non-string {key!r})")
    system = obj.get("system")
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": obj["instruction"]}, {"role": "assistant", "content": obj["output"]}]


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


def _plain_pieces(obj: dict, where: str) -> list[tuple[str, bool]]:
    """Without a chat template: "system\n\ninstruction\n" as the prompt, the output as the response."""
    messages = _messages_of(obj, where)
    if "messages" in obj:
        raise DataError(f"{where}: multi-turn 'messages' need --use_chat_template true")
    system = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
    user = next(m["content"] for m in messages if m["role"] == "user")
    answer = next(m["content"] for m in messages if m["role"] == "assistant")
    return [(system + user + "\n", False), (answer, True)]


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


def build_sample(obj: dict, tok, use_chat_template: bool, system_prompt: str | None, max_len: int,
                 where: str, stats: DatasetStats) -> Sample | None:
    """One jsonl object -> a Sample, or None (counted) when no response token survives truncation."""
    if "text" in obj and "messages" not in obj and "instruction" not in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        ids = tok.encode(obj["text"], add_bos=tok.adds_bos) + [tok.eos_id]
        trained = [False] + [True] * (len(ids) - 1)
    else:
        if use_chat_template:
            pieces = _chat_pieces(tok, _messages_of(obj, where), system_prompt, where)
        else:
            pieces = _plain_pieces(obj, where)
        ids, trained = _tokenize_pieces(tok, pieces)
    if len(ids) > max_len:
        stats.truncated += 1
        ids, trained = truncate(ids, trained, max_len, tok.bos_id)
    labels = shift_labels(ids, trained)
    if all(t == IGNORE_INDEX for t in labels):
        stats.skipped_no_response += 1
        return None
    return Sample(ids, labels)


def load_samples(path: str, tok, use_chat_template: bool, system_prompt: str | None,
                 max_len: int) -> tuple[list[Sample], DatasetStats]:
    """Every line of a jsonl file as a Sample; errors name file and line; an empty result is an error."""
    stats = DatasetStats()
    samples = []
    for line_no, obj in read_jsonl(path):
        sample = build_sample(obj, tok, use_chat_template, system_prompt, max_len, f"{path}:{line_no}", stats)
        if sample is not None:
            samples.append(sample)
    stats.samples = len(samples)
    if not samples:
        why = f" ({stats.skipped_no_response} had no response tokens left after truncation)" \
            if stats.skipped_no_response else ""
        raise DataError(f"{path}: no usable training samples{why}")
    return samples, stats


@dataclass
class Row:
    """One batch row: a sample, or several packed samples with their own positions and segment ids."""
    ids: list[int]
    labels: list[int]
    positions: list[int]
    segments: list[int]


def pack(samples: list[Sample], max_len: int, packing: bool) -> list[Row]:
    """Rows in sample order; with packing, consecutive samples share a row up to ``max_len`` tokens."""
    rows: list[Row] = []
    for s in samples:
        n = len(s.ids)
        if packing and rows and len(rows[-1].ids) + n <= max_len:
            row = rows[-1]
            row.segments += [row.segments[-1] + 1] * n
            row.ids += s.ids
            row.labels += s.labels
            row.positions += list(range(n))
        else:
            rows.append(Row(list(s.ids), list(s.labels), list(range(n)), [0] * n))
    return rows


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The same permutation of range(n) on every rank for a given (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def collate(rows: list[Row | None], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded tensors [B, S] (S rounded up to ``multiple``); None rows are all padding, no loss."""
    length = max([len(r.ids) for r in rows if r is not None] + [1])
    length = int(math.ceil(length / multiple) * multiple)
    b = len(rows)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(length).repeat(b, 1)
    segments = torch.full((b, length), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r is None:
            continue
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        labels[i, :n] = torch.tensor(r.labels)
        positions[i, :n] = torch.tensor(r.positions)
        segments[i, :n] = torch.tensor(r.segments)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "segment_ids": segments}


class StepBatches:
    """Deterministic schedule of rows: which rows each DP rank trains on at each optimizer step.

    One optimizer step consumes a global batch of ``micro_batch * dp * accumulation`` rows of the epoch's
    permutation; the gradient is the token mean over all of them, however they are split over DP ranks
    and accumulation micro-steps. The final short step is filled with empty rows (no loss).
    """

    def __init__(self, rows: list[Row], micro_batch: int, dp: int, accumulation: int, seed: int):
        self.rows, self.micro_batch, self.dp, self.accumulation, self.seed = rows, micro_batch, dp, accumulation, seed
        self.global_batch = micro_batch * dp * accumulation
        self.steps_per_epoch = int(math.ceil(len(rows) / self.global_batch))
        self._order = (None, [])

    def step_rows(self, epoch: int, step: int) -> list[Row | None]:
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.rows), self.seed, epoch))
        order = self._order[1]
        chosen = order[step * self.global_batch:(step + 1) * self.global_batch]
        return [self.rows[i] for i in chosen] + [None] * (self.global_batch - len(chosen))

    def micro_batches(self, epoch: int, step: int, dp_rank: int) -> tuple[list[list[Row | None]], int]:
        """This DP rank's micro-batches for the step, and the step's trained-token count over all ranks."""
        rows = self.step_rows(epoch, step)
        total = sum(sum(1 for t in r.labels if t != IGNORE_INDEX) for r in rows if r is not None)
        per_micro = self.micro_batch * self.dp
        mine = [rows[a * per_micro + dp_rank * self.micro_batch:a * per_micro + (dp_rank + 1) * self.micro_batch]
                for a in range(self.accumulation)]
        return mine, total
