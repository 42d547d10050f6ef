"""Record shapes -> one canonical form: a list of chat messages, or a pretraining text.

    messages           {"messages": [{"role", "content"}, ...]}                OpenAI style
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
    alpaca             {"instruction", "input"?, "output", "system"?}  input appended to the instruction
    prompt_completion  {"prompt", "completion"} strings or message lists (TRL)
    text               {"text"}                                                 pretraining

``auto`` detects the shape per record from its keys.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..jsonl import DataError

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclass
class Record:
    """A record in canonical form: ``messages`` for chats, ``text`` for pretraining; ``raw`` marks a string
    prompt/completion pair (continued as written when no chat template is used)."""
    format: str
    messages: list | None = None
    text: str | None = None
    raw: tuple | None = None  # (prompt, completion) strings
    reference: str | None = None  # a prompt's reference answer (generation, GRPO)


def detect(obj: dict, where: str) -> str:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    raise DataError(f"{where}: unknown record shape (keys {sorted(obj)[:8]}); expected 'messages', "
                    f"'conversations' (sharegpt), 'instruction'/'output' (alpaca), 'prompt'/'completion' or 'text'")


def _check_messages(messages, where: str, key: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: every message needs string 'role' and 'content' fields")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _text_field(obj: dict, key: str, where: str, required: bool = True) -> str:
    value = obj.get(key)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: expected 'instruction' and 'output' strings, 'messages', or 'text' "
                        f"(missing or non-string {key!r})")
    return value


def _sharegpt(obj: dict, where: str) -> list[dict]:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise DataError(f"{where}: conversations[{i}] needs string 'from' and 'value' fields")
        role = SHAREGPT_ROLES.get(t.get("from"))
        if role is None:
            raise DataError(f"{where}: conversations[{i}] has unknown 'from' {t.get('from')!r} "
                            f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": t["value"]})
    return messages


def _alpaca(obj: dict, where: str) -> list[dict]:
    instruction = _text_field(obj, "instruction", where)
    output = _text_field(obj, "output", where)
    extra = _text_field(obj, "input", where, required=False)
    user = f"{instruction}\n{extra}" if extra else instruction
    system = obj.get("system")
    return ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _prompt_completion(obj: dict, where: str) -> Record:
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return Record("prompt_completion", [{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": completion}], raw=(prompt, completion))
    prompt = _check_messages(prompt, where, "prompt") if not isinstance(prompt, str) else \
        [{"role": "user", "content": prompt}]
    completion = _check_messages(completion, where, "completion") if not isinstance(completion, str) else \
        [{"role": "assistant", "content": completion}]
    return Record("prompt_completion", prompt + completion)


MAIN_KEY = {"messages": "messages", "sharegpt": "conversations", "prompt_completion": "prompt", "alpaca": "instruction"}


def to_record(obj: dict, fmt: str, where: str) -> Record:
    """One parsed object as a Record; ``fmt`` is one of FORMATS (``auto``: detected from the keys)."""
    fmt = detect(obj, where) if fmt == "auto" else fmt
    if fmt == "text":
        if not isinstance(obj.get("text"), str):
            raise DataError(f"{where}: 'text' must be a string")
        return Record("text", text=obj["text"])
    if fmt != "alpaca" and MAIN_KEY[fmt] not in obj:
        raise DataError(f"{where}: --data_format {fmt} needs a {MAIN_KEY[fmt]!r} field")
    if fmt == "prompt_completion":
        if "completion" not in obj:
            raise DataError(f"{where}: 'prompt' without 'completion' has nothing to train on")
        record = _prompt_completion(obj, where)
    elif fmt == "messages":
        record = Record(fmt, _check_messages(obj["messages"], where))
    elif fmt == "sharegpt":
        record = Record(fmt, _sharegpt(obj, where))
    else:
        record = Record(fmt, _alpaca(obj, where))
    if not any(m["role"] == "assistant" for m in record.messages):
        key = "conversations" if fmt == "sharegpt" else "messages"
        raise DataError(f"{where}: {key!r} has no assistant turn to train on")
    return record


def prompt_record(obj: dict, where: str) -> Record:
    """A prompt to continue (solver_generate, GRPO): the conversation without its trailing assistant turns (the
    reference answer, kept as ``reference``), or a plain string ``prompt``, continued exactly as written."""
    if "prompt" in obj and isinstance(obj["prompt"], str):
        completion = obj.get("completion")
        return Record("prompt_completion", raw=(obj["prompt"], None),
                      reference=completion if isinstance(completion, str) else None)
    if "prompt" in obj:
        messages = _check_messages(obj["prompt"], where, "prompt")
    elif "messages" in obj:
        messages = _check_messages(obj["messages"], where)
    elif "conversations" in obj:
        messages = _sharegpt(obj, where)
    elif "instruction" in obj:
        instruction = obj["instruction"]
        if isinstance(instruction, list) and all(isinstance(v, str) for v in instruction):
            instruction = "\n".join(instruction)
        if not isinstance(instruction, str):
            raise DataError(f"{where}: expected an 'instruction' string or a 'messages' list")
        extra = obj.get("input")
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string")
        user = f"{instruction}\n{extra}" if isinstance(extra, str) and extra else instruction
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    else:
        raise DataError(f"{where}: expected an 'instruction' string or a 'messages' list (or sharegpt "
                        f"'conversations', or a 'prompt'); got keys {sorted(obj)[:8]}")
    reference = None
    while messages and messages[-1]["role"] == "assistant":  # the reference answer
        reference = messages[-1]["content"] if reference is None else reference
        messages = messages[:-1]
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: 'messages' has no user turn to answer")
    if reference is None and isinstance(obj.get("output"), str):
        reference = obj["output"]
    return Record("prompt", messages, reference=reference)
