"""Rule rewards (GRPO training and solver_generate scoring), and loading a user's own reward function.

Every reward function has the signature

    def reward(completion: str, sample: dict) -> float

``sample`` is the jsonl line's object (``instruction``/``messages``, ``answer`` and any other fields) plus
``completion_tokens`` (int), ``completion_ids`` (list of token ids) and ``truncated`` (bool: it hit
--max_new_tokens). Built-in rewards:

accuracy  1.0 if the completion's final answer equals ``sample["answer"]``, else 0.0. The final answer is the
          last ``\\boxed{...}``, else the last ``<answer>...</answer>``, else the last ``#### N``; none: 0.0.
          Numbers compare numerically (``1,000`` = ``1000.0``, ``3/4`` = ``0.75``); other text compares after
          trimming whitespace, ``$`` and a trailing period, case-insensitively.
format    1.0 if the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>`` (whitespace
          around them allowed, one of each tag, answer not empty), else 0.0.
length    1.0 inside [length_min, length_max] completion tokens, falling linearly to 0.0 at half the minimum
          and at twice the maximum.
last_number  1.0 if the last number written anywhere in the completion equals ``sample["answer"]`` (compared
          numerically, as accuracy does), else 0.0: a lenient reading for models that do not yet use an answer
          format (lm-evaluation-harness's "flexible extract" for GSM8K reads answers the same way).

A function may name the fields it needs in the input lines (``fn.required_fields = ("answer",)``, as accuracy
does): a data file lacking one is refused before any model is loaded (``check_required_fields``).
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
from typing import Callable

from .jsonl import DataError
from .runtime import UsageError

RewardFn = Callable[[str, dict], float]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_HASHES = re.compile(r"####\s*([^\n]+)")
_FORMAT = re.compile(r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*<answer>((?:(?!<answer>|</answer>).)*)"
                     r"</answer>\s*$", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None if there is none or it never closes."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def extract_answer(completion: str) -> str | None:
    """The completion's final answer (see the module docstring for the order), or None."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1]
    hashes = _HASHES.findall(completion)
    return hashes[-1] if hashes else None


def as_number(text: str) -> float | None:
    text = text.strip().strip("$").replace(",", "").rstrip(".").strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_match(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def answers_match(predicted: str, expected: str) -> bool:
    a, b = as_number(predicted), as_number(expected)
    if a is not None and b is not None:
        return numbers_match(a, b)
    norm = lambda s: s.strip().strip("$").rstrip(".").strip().lower()  # noqa: E731
    return norm(predicted) == norm(expected)


def accuracy_reward(completion: str, sample: dict) -> float:
    predicted = extract_answer(completion)
    return 1.0 if predicted is not None and answers_match(predicted, str(sample["answer"])) else 0.0


accuracy_reward.required_fields = ("answer",)


_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in the text (``-12``, ``1,000``, ``2.5``; a ``-`` between digits is not a sign), or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def last_number_reward(completion: str, sample: dict) -> float:
    predicted = last_number(completion)
    return 1.0 if predicted is not None and answers_match(predicted, str(sample["answer"])) else 0.0


last_number_reward.required_fields = ("answer",)


def format_reward(completion: str, sample: dict) -> float:
    m = _FORMAT.match(completion)
    return 1.0 if m and m.group(1).strip() else 0.0


def make_length_reward(length_min: int, length_max: int) -> RewardFn:
    def length_reward(completion: str, sample: dict) -> float:
        n = sample["completion_tokens"]
        if length_min <= n <= length_max:
            return 1.0
        if n < length_min:
            return max(0.0, (n - length_min / 2) / (length_min / 2)) if length_min > 0 else 1.0
        return max(0.0, 1.0 - (n - length_max) / max(length_max, 1))
    return length_reward


def load_user_reward(spec: str) -> RewardFn:
    """``path/to/file.py:function`` -> the function (the file is the user's own code, run as a plug-in)."""
    path, _, name = spec.rpartition(":")
    if not os.path.isfile(path):
        raise UsageError(f"--reward_funcs {spec}: reward file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"user_reward_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - reported with the file's name
        raise UsageError(f"--reward_funcs {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--reward_funcs {spec}: {path} defines no function {name!r}")
    return fn


BUILTIN = ("accuracy", "format", "length", "last_number")


def build_rewards(names: str, weights: str | None, length_band=(16, 256)) -> list[tuple[str, RewardFn, float]]:
    """Parse --reward_funcs / --reward_weights into (name, function, weight) triples."""
    items = [n.strip() for n in names.split(",") if n.strip()]
    if not items:
        raise UsageError("--reward_funcs is empty")
    ws = [float(w) for w in weights.split(",")] if weights else [1.0] * len(items)
    if len(ws) != len(items):
        raise UsageError(f"--reward_weights has {len(ws)} values for {len(items)} --reward_funcs")
    rewards = []
    for name, w in zip(items, ws):
        if name == "accuracy":
            fn = accuracy_reward
        elif name == "format":
            fn = format_reward
        elif name == "length":
            fn = make_length_reward(*length_band)
        elif name == "last_number":
            fn = last_number_reward
        elif ":" in name and name.rsplit(":", 1)[0].endswith(".py"):
            fn = load_user_reward(name)
        else:
            raise UsageError(f"unknown reward {name!r}: use {', '.join(BUILTIN)} or path/to/file.py:function")
        rewards.append((name, fn, w))
    return rewards


def score(rewards, completion: str, sample: dict) -> list[float]:
    """Each reward function's value for one completion; a function that raises is an error naming it."""
    values = []
    for name, fn, _ in rewards:
        try:
            value = float(fn(completion, sample))
        except Exception as exc:  # noqa: BLE001 - the user's function: report which one failed and how
            raise UsageError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
        if not math.isfinite(value):
            raise UsageError(f"reward {name!r} returned {value} (rewards must be finite numbers)")
        values.append(value)
    return values


def reward_sample(obj: dict, completion_ids: list[int], truncated: bool) -> dict:
    """The ``sample`` a reward function sees: the input line plus the completion's token facts."""
    return {**obj, "completion_tokens": len(completion_ids), "completion_ids": completion_ids, "truncated": truncated}


def total(rewards, values: list[float]) -> float:
    """The weighted sum of one completion's reward values."""
    return sum(w * v for (_, _, w), v in zip(rewards, values))


def check_required_fields(rewards, records) -> None:
    """Every record (``(where, object)`` pairs, as data.readers.read_records gives them) holds the fields the
    reward functions need (``fn.required_fields``), else a DataError naming the place, field and reward."""
    needs = [(name, f) for name, fn, _ in rewards for f in getattr(fn, "required_fields", ())]
    if not needs:
        return
    for where, obj in records:
        for name, f in needs:
            if f not in obj:
                raise DataError(f"{where}: the {name} reward needs the field {f!r} in every line")
