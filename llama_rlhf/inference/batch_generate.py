"""solver_generate's job: prompts from jsonl, split over the model replicas, generated, gathered on rank 0, written.

Input records (.jsonl, .json, .parquet, datasets folders): {"instruction": "...", "system": optional, ...},
{"messages": [{"role", "content"}, ...], ...}, sharegpt "conversations", or {"prompt": ...} (a plain string is
continued exactly as written, no template). A trailing assistant message (or a "completion") is a reference
answer, not part of the prompt. Every other field is carried
through; an input "output" field is kept as "reference_output". Output: ``log_dir/results.jsonl``, one line
per input line in input order, with "output" (the samples' texts), "num_prompt_tokens", "num_output_tokens"
and "finish_reason" ("stop": an end token, "length": --max_new_tokens or --max_seq_len). With reward functions
(--reward_funcs) each line also gets "rewards" ({name: [value per sample]}), "reward" (the weighted sums) and,
with accuracy, "predicted_answer" (each sample's extracted final answer); ``log_dir/summary.json`` holds the
scores of llama_rlhf.scoring (mean reward per function, mean@n, pass@k, maj@n).

Replicas: every (DP, SP) coordinate holds a whole model (generation runs whole sequences on SP ranks), so
prompts are dealt round-robin over DP x SP replicas; MP ranks of a replica decode together.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .engine import generate
from ..data.formats import prompt_record
from ..data.readers import read_records
from ..jsonl import DataError, write_json_atomic, write_jsonl_atomic
from ..rewards import reward_sample, score, total
from ..runtime import UsageError, log
from .sampling import SamplingParams
from .scoring import format_table, predicted_answers, summarize


@dataclass
class Prompt:
    line: str  # line number (or parquet/arrow row) in the input file
    obj: dict  # the input object
    ids: list[int]
    truncated: int = 0  # tokens cut from the left


def prompt_ids(obj: dict, tok, use_chat_template: bool, system_prompt: str | None, where: str) -> list[int]:
    """Token ids of the prompt, as solver_train renders the same line (chat template, or "system\\n\\nuser\\n");
    a plain string ``prompt`` is continued exactly as written (no template, nothing appended)."""
    record = prompt_record(obj, where)
    if record.messages is None:
        return tok.encode(record.raw[0], add_bos=tok.adds_bos)
    messages = record.messages
    if use_chat_template:
        return tok.encode_chat(messages, add_generation_prompt=True, system_prompt=system_prompt)
    if len([m for m in messages if m["role"] != "system"]) > 1:
        raise DataError(f"{where}: multi-turn 'messages' need --use_chat_template true")
    system = next((m["content"] for m in messages if m["role"] == "system"), system_prompt)
    user = next(m["content"] for m in messages if m["role"] == "user")
    return tok.encode((system + "\n\n" if system else "") + user + "\n", add_bos=tok.adds_bos)


def fit_prompt(ids: list[int], max_seq_len: int, bos_id) -> tuple[list[int], int]:
    """Cut a prompt that leaves no room for a new token (>= max_seq_len) from the left to max_seq_len - 1
    tokens, keeping a leading BOS; returns (ids, tokens cut)."""
    if len(ids) < max_seq_len:
        return ids, 0
    keep = max_seq_len - 1
    head = ids[:1] if bos_id is not None and ids[:1] == [bos_id] and keep > 1 else []
    out = head + ids[len(ids) - (keep - len(head)):]
    return out, len(ids) - len(out)


def read_prompts(path: str, tok, use_chat_template: bool, system_prompt: str | None, max_seq_len: int,
                 refuse_too_long: bool) -> list[Prompt]:
    """Every line of ``path`` as a Prompt; errors name file and line; too-long prompts are cut from the left, or
    with ``refuse_too_long`` (solver_generate's --strict) refused."""
    if use_chat_template and tok.chat_template is None:
        raise UsageError("--use_chat_template: this tokenizer has no chat template (none in the checkpoint and "
                         "none built in for this model type); pass --use_chat_template false")
    prompts = []
    for where, obj in read_records(path):
        line = where[len(path) + 1:].strip()
        ids = prompt_ids(obj, tok, use_chat_template, system_prompt, where)
        if len(ids) >= max_seq_len and refuse_too_long:
            raise DataError(f"{where}: the prompt has {len(ids)} tokens, which leaves no room for a response within "
                            f"--max_seq_len {max_seq_len}; shorten it, raise --max_seq_len, or drop --strict to "
                            f"cut it from the left")
        ids, cut = fit_prompt(ids, max_seq_len, tok.bos_id)
        prompts.append(Prompt(line, obj, ids, cut))
    if not prompts:
        raise DataError(f"{path}: no prompts (the file has no non-blank lines)")
    return prompts


SYNC_CHUNK_BATCHES = 8  # replicas meet after every SYNC_CHUNK_BATCHES x --max_batch_size prompts


def replica_of(ps) -> tuple[int, int]:
    """(this rank's replica index, number of replicas): one replica per (DP, SP) coordinate."""
    return ps.dp_rank * ps.sp_size + ps.sp_rank, ps.dp_size * ps.sp_size


def result_row(prompt: Prompt, completions, tok, rewards=None) -> dict:
    row = {k: v for k, v in prompt.obj.items() if k != "output"}
    if "output" in prompt.obj:
        row["reference_output"] = prompt.obj["output"]
    row["output"] = [tok.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    row["num_prompt_tokens"] = len(prompt.ids)
    if prompt.truncated:
        row["prompt_tokens_cut"] = prompt.truncated
    row["num_output_tokens"] = [len(c.token_ids) for c in completions]
    row["finish_reason"] = [c.finish_reason for c in completions]
    if rewards:
        values = [score(rewards, text, reward_sample(prompt.obj, c.token_ids, c.finish_reason == "length"))
                  for text, c in zip(row["output"], completions)]  # [samples][rewards]
        row["rewards"] = {name: [v[k] for v in values] for k, (name, _, _) in enumerate(rewards)}
        row["reward"] = [total(rewards, v) for v in values]
        if any(name == "accuracy" for name, _, _ in rewards):
            row["predicted_answer"] = predicted_answers(row["output"])
    return row


def gather_rows(mine: list[tuple[int, dict]], total: int, ps) -> list[dict] | None:
    """Every replica's (index, row) pairs on global rank 0, in input order; None on other ranks."""
    if ps.mp_rank != 0:
        return None
    parts = [mine]
    if dist.is_initialized() and ps.dp_size * ps.sp_size > 1:
        parts = [None] * (ps.dp_size * ps.sp_size) if ps.rank == 0 else None
        dist.gather_object(mine, parts, dst=0, group=ps.dpsp_group)
    if ps.rank != 0:
        return None
    rows = [None] * total
    for part in parts:
        for i, row in part:
            rows[i] = row
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        raise RuntimeError(f"results for prompts {missing[:10]} never arrived from their replica")
    return rows


def generate_rows(prompts: list[Prompt], model, tok, ps, params: SamplingParams, *, max_batch_size: int,
                  max_seq_len: int, seed: int, compute_dtype, rewards=None, progress=None,
                  progress_every: float = 30.0, static_decode: bool = False) -> list[dict] | None:
    """Every prompt's result row (scored when ``rewards`` are given), prompts dealt over the replicas; the rows
    in input order on global rank 0, None elsewhere. Every rank calls it.

    The replicas meet after every chunk of prompts: a replica that is done early waits in a collective (bounded by
    --distributed_timeout_minutes) for one chunk of the others' work at most, not for the rest of the job.
    Sampling is keyed by prompt index, so the chunks change no result."""
    replica, replicas = replica_of(ps)
    indices = list(range(replica, len(prompts), replicas))
    outputs, tokens_before, t0 = [], [0], time.time()

    def chunk_progress(done, total, tokens, seconds):  # one chunk's counts -> this replica's whole share
        if progress is not None:
            progress(len(outputs) + done, len(indices), tokens_before[0] + tokens, time.time() - t0)
        if done == total:
            tokens_before[0] += tokens

    chunk = SYNC_CHUNK_BATCHES * max_batch_size
    for start in range(0, -(-len(prompts) // replicas), chunk):  # the same number of chunks on every replica
        part = indices[start:start + chunk]
        if part:
            outputs += generate(model, [prompts[i].ids for i in part], params, tok.end_ids, ps,
                                max_batch_size=max_batch_size, max_seq_len=max_seq_len, seed=seed, prompt_keys=part,
                                compute_dtype=compute_dtype, progress=chunk_progress, progress_every=progress_every,
                                static_decode=static_decode)
        if replicas > 1:
            dist.all_reduce(torch.zeros(1, device=ps.device), group=ps.dpsp_group)
    mine = [(i, result_row(prompts[i], out, tok, rewards)) for i, out in zip(indices, outputs)]
    return gather_rows(mine, len(prompts), ps)


def run_generation(args, model, tok, ps, compute_dtype, rewards=None) -> str | None:
    """Generate for every line of args.label_file (scored with ``rewards``: summary.json and a printed table);
    returns the results path on rank 0 (None elsewhere)."""
    prompts = read_prompts(args.label_file, tok, args.use_chat_template, args.system_prompt, args.max_seq_len,
                           args.strict)
    cut = [p for p in prompts if p.truncated]
    log(f"{args.label_file}: {len(prompts)} prompts, {len(cut)} cut from the left to fit --max_seq_len "
        f"{args.max_seq_len}" + (f" (lines {', '.join(str(p.line) for p in cut[:10])}"
                                 f"{' ...' if len(cut) > 10 else ''})" if cut else ""), ps)
    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens,
                            args.num_samples_per_prompt)
    replicas = replica_of(ps)[1]

    def progress(done, total, tokens, seconds):
        log(f"replica 0 of {replicas}: {done}/{total} of its prompts done, {tokens} tokens, "
            f"{tokens / max(seconds, 1e-9):.1f} tokens/s", ps)

    rows = generate_rows(prompts, model, tok, ps, params, max_batch_size=args.max_batch_size,
                         max_seq_len=args.max_seq_len, seed=args.seed, compute_dtype=compute_dtype, rewards=rewards,
                         progress=progress, progress_every=args.log_every,
                         static_decode=getattr(args, "cuda_graphs", False) and ps.device.type == "cuda")
    if rows is None:
        return None
    os.makedirs(args.log_dir, exist_ok=True)
    path = os.path.join(args.log_dir, "results.jsonl")
    write_jsonl_atomic(path, rows)
    if rewards:
        summary = summarize(rows, [name for name, _, _ in rewards], args.pass_k)
        summary_path = os.path.join(args.log_dir, "summary.json")
        write_json_atomic(summary_path, summary)
        log(format_table(summary) + f"\nscores written to {summary_path}")
    return path
