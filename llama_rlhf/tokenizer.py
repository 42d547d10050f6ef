"""One tokenizer interface over tokenizer.json, tokenizer.model (sentencepiece or tiktoken) and qwen.tiktoken."""
from __future__ import annotations

import base64
import binascii
import os
import re
import unicodedata

from jinja2.exceptions import TemplateError

from llama_rlhf.chat_template import (builtin_template, family_name, merge_system_into_user, read_checkpoint_template,
                                      render_template)
from llama_rlhf.models.config import read_json

KINDS = ("tokenizers", "sentencepiece", "tiktoken", "qwen_tiktoken")
KIND_FILES = {"tokenizers": "tokenizer.json", "sentencepiece": "tokenizer.model",
              "tiktoken": "tokenizer.model", "qwen_tiktoken": "qwen.tiktoken"}
SEARCHED_FILES = ("tokenizer.json", "qwen.tiktoken", "tokenizer.model")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN1_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's Llama 3 special tokens, numbered from len(base vocab); 3.1+ renamed some reserved slots (same ids).
_LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
LLAMA3_SPECIALS = _LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
_LLAMA31_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA31_SPECIALS = _LLAMA31_NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA31_NAMED))]
# Qwen1's special tokens, numbered from len(base vocab) (= 151643 in the released qwen.tiktoken).
QWEN1_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


class Tokenizer:
    """One small interface for every backend: encode/decode text, end tokens, chat rendering."""

    def __init__(self, *, kind, vocab_size, bos_id, eos_id, pad_id, end_ids, chat_template, token_names,
                 adds_bos, model_type=None):
        self.kind = kind
        self.vocab_size = vocab_size                  # ids the tokenizer can produce, special tokens included
        self.bos_id = bos_id
        self.eos_id = eos_id                          # the primary end token
        self.pad_id = next(i for i in (pad_id, eos_id, 0) if i is not None)
        self.end_ids = frozenset(i for i in [eos_id, *end_ids] if i is not None)
        self.chat_template = chat_template
        self.token_names = token_names                # bos_token, eos_token, ... as the chat template sees them
        self.adds_bos = adds_bos                      # whether this checkpoint starts sequences with BOS
        self.model_type = model_type
        self.source_file = None                       # the file it was read from (load_tokenizer sets it)

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids; BOS prepended if asked (never twice)."""
        ids = self._encode(text)
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ids (list, tuple or tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self._decode(ids, skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    system_prompt: str | None = None) -> str:
        """The prompt text the chat template makes of `messages` (system_prompt is used if none is given)."""
        if self.chat_template is None:
            raise ValueError(f"this {self.kind} tokenizer has no chat template: the checkpoint ships none and none "
                             f"is built in for model_type={self.model_type!r}; add a chat_template to its "
                             "tokenizer_config.json or a chat_template.jinja file")
        if not messages:
            raise ValueError("render_chat needs at least one message")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers does
        if system_prompt is not None and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}] + messages
        if family_name(self.model_type).startswith("gemma"):  # Gemma templates take no system role
            messages = merge_system_into_user(messages)
        try:
            return render_template(self.chat_template, messages, add_generation_prompt, self.token_names)
        except TemplateError:
            if messages[0].get("role") != "system":
                raise
        # The template refused the system message: retry with it folded into the first user message.
        return render_template(self.chat_template, merge_system_into_user(messages), add_generation_prompt,
                               self.token_names)

    def encode_chat(self, messages, add_generation_prompt=True, system_prompt=None) -> list[int]:
        """Token ids of the rendered chat; BOS added only if the checkpoint uses one and the template did not."""
        text = self.render_chat(messages, add_generation_prompt, system_prompt)
        return self.encode(text, add_bos=self.adds_bos)


class HFTokenizer(Tokenizer):
    """tokenizer.json through the `tokenizers` library (Llama 3 HF, Qwen2/3, Gemma2, Mistral, SmolLM2, ...)."""

    def __init__(self, backend, **kwargs):
        self.backend = backend
        super().__init__(**kwargs)

    def _encode(self, text):
        return self.backend.encode(text, add_special_tokens=False).ids

    def _decode(self, ids, skip_special_tokens):
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece tokenizer.model (Meta Llama 2 originals); control-token strings in text map to their ids."""

    def __init__(self, sp, **kwargs):
        self.sp = sp
        self.special_ids = {i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
        pieces = sorted(filter(None, map(sp.id_to_piece, self.special_ids)), key=len, reverse=True)
        self.special_re = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None
        super().__init__(**kwargs)

    def _encode(self, text):
        if self.special_re is None:
            return self.sp.encode(text)
        # Each text piece between control tokens is encoded on its own (with sentencepiece's prefix space), as
        # Meta's chat code encodes each turn; transformers v5 instead drops the prefix space after a control token.
        ids = []
        for i, chunk in enumerate(self.special_re.split(text)):  # odd chunks are special-token strings
            if i % 2:
                ids.append(self.sp.piece_to_id(chunk))
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def _decode(self, ids, skip_special_tokens):
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        text, run = "", []
        for i in ids + [None]:
            if i is not None and i not in self.special_ids:
                run.append(i)
                continue
            if run:  # sentencepiece drops a run's leading space; keep it unless the run starts the text
                keep_space = text and self.sp.id_to_piece(run[0]).startswith("\u2581")
                text += (" " if keep_space else "") + self.sp.decode(run)
                run = []
            if i is not None:
                text += self.sp.id_to_piece(i)
        return text


class TiktokenTokenizer(Tokenizer):
    """A base64-rank BPE file through `tiktoken` (Meta Llama 3 tokenizer.model, Qwen1 qwen.tiktoken)."""

    MAX_CHARS = 400_000       # Meta's Llama 3 tokenizer encodes long texts in pieces of this size ...
    MAX_RUN = 25_000          # ... and cuts runs of (non-)whitespace longer than this, as tiktoken is slow on them

    def __init__(self, encoding, special_ids, normalize_nfc, chunk_long_text, **kwargs):
        self.encoding = encoding
        self.special_ids = frozenset(special_ids)
        self.normalize_nfc = normalize_nfc      # Qwen1 NFC-normalises text before encoding
        self.chunk_long_text = chunk_long_text  # Meta's Llama 3 tokenizer splits very long inputs
        super().__init__(**kwargs)

    def _encode(self, text):
        if self.normalize_nfc:
            text = unicodedata.normalize("NFC", text)
        pieces = _split_long_text(text, self.MAX_CHARS, self.MAX_RUN) if self.chunk_long_text else [text]
        ids = []
        for piece in pieces:
            ids.extend(self.encoding.encode(piece, allowed_special="all", disallowed_special=()))
        return ids

    def _decode(self, ids, skip_special_tokens):
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.encoding.decode(ids, errors="replace")


def _split_long_text(text: str, max_chars: int, max_run: int) -> list[str]:
    """Cut text into pieces of <= max_chars, and wherever a run of (non-)whitespace exceeds max_run chars."""
    if len(text) <= max_run:
        return [text]
    pieces = []
    for start in range(0, len(text), max_chars):
        window, piece_start, run, run_is_space = text[start:start + max_chars], 0, 0, None
        for i, char in enumerate(window):
            if char.isspace() == run_is_space:
                run += 1
                if run > max_run:
                    pieces.append(window[piece_start:i])
                    piece_start, run = i, 1
            else:
                run, run_is_space = 1, char.isspace()
        pieces.append(window[piece_start:])
    return pieces


def tokenizer_source(tokenizer_file: str | None, ckpt_dir: str | None) -> str | None:
    """Where a run's tokenizer is, the one rule every solver uses: ``--tokenizer_file`` (a tokenizer file, or a
    folder holding one, trailing slash or not), else ``--ckpt_dir``; None when neither is given. A bad path is a
    one-line error saying whether it does not exist or is a folder without a tokenizer."""
    flag, path = ("--tokenizer_file", tokenizer_file) if tokenizer_file else ("--ckpt_dir", ckpt_dir)
    if not path:
        return None
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, n)) for n in SEARCHED_FILES):
        raise FileNotFoundError(f"{flag} {path} is a folder without a tokenizer (looked for "
                                f"{', '.join(SEARCHED_FILES)})")
    return path


def load_tokenizer(path: str, kind: str | None = None, model_type: str | None = None) -> Tokenizer:
    """Load the tokenizer of a checkpoint directory (or a tokenizer file); `kind` is detected when None."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist (expected a checkpoint directory holding "
                                f"one of {', '.join(SEARCHED_FILES)}, or one of those files)")
    file, kind = _find_tokenizer_file(path, kind)
    folder = os.path.dirname(os.path.abspath(file))
    model_config = _read_json(folder, "config.json")
    model_type = model_type or model_config.get("model_type")
    config_end_ids = (_as_id_list(model_config.get("eos_token_id"))
                      + _as_id_list(_read_json(folder, "generation_config.json").get("eos_token_id")))
    loader = {"tokenizers": _load_hf, "sentencepiece": _load_sentencepiece,
              "tiktoken": _load_llama3_tiktoken, "qwen_tiktoken": _load_qwen1_tiktoken}[kind]
    tok = loader(file, folder, model_type, config_end_ids)
    tok.source_file = file  # the data cache is keyed by its bytes
    return tok


def _find_tokenizer_file(path: str, kind: str | None) -> tuple[str, str]:
    """The tokenizer file under `path` and its kind (sniffing tokenizer.model when the kind is not given)."""
    if os.path.isdir(path):
        names = [KIND_FILES[kind]] if kind else list(SEARCHED_FILES)
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"no tokenizer in directory {path!r}: looked for {', '.join(names)}")
        file = found[0]
    else:
        file = path
    if kind is None:
        name = os.path.basename(file)
        if name.endswith(".json"):
            kind = "tokenizers"
        elif name.endswith(".tiktoken"):
            kind = "qwen_tiktoken"
        else:
            kind = _sniff_model_file(file)
    return file, kind


def _sniff_model_file(file: str) -> str:
    """'tiktoken' for a text file of `base64token rank` lines, 'sentencepiece' for a sentencepiece protobuf."""
    with open(file, "rb") as f:
        first_line = f.readline(4096).split()
    if len(first_line) == 2 and first_line[1].isdigit():
        try:
            base64.b64decode(first_line[0], validate=True)
            return "tiktoken"
        except (binascii.Error, ValueError):
            pass
    import sentencepiece as spm
    try:
        spm.SentencePieceProcessor(model_file=file)
    except Exception as error:
        raise ValueError(f"{file!r} is neither a sentencepiece model nor a tiktoken rank file: {error}") from None
    return "sentencepiece"


def _read_json(folder: str, name: str) -> dict:
    """The JSON object in folder/name, or {} if the file is absent."""
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        return {}
    return read_json(file)  # malformed: a ConfigError naming the file and the position


def _as_id_list(value) -> list[int]:
    """An `eos_token_id`-style value (None, int or list of ints) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _token_content(value) -> str | None:
    """A tokenizer_config token entry (string, or dict with "content") as its string."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder, known_tokens, kind, model_type) -> str | None:
    """The checkpoint's own chat template, else a built-in one."""
    return read_checkpoint_template(folder) or builtin_template(known_tokens, kind, model_type)


def _load_hf(file, folder, model_type, config_end_ids) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json (+ config.json / generation_config.json ids)."""
    from tokenizers import Tokenizer as Backend
    backend = Backend.from_file(file)
    backend.no_truncation()  # a tokenizer.json may carry truncation/padding settings; encode() must not apply them
    backend.no_padding()
    config = _read_json(folder, "tokenizer_config.json")
    model_config = _read_json(folder, "config.json")
    token_names = {key: _token_content(config[key]) for key in SPECIAL_TOKEN_KEYS if _token_content(config.get(key))}

    def token_id(key: str) -> int | None:
        """Id of a named special token: tokenizer_config's name if it has the key, else config.json's id."""
        if key in config:  # an explicit null (e.g. Qwen's bos_token) means the checkpoint has none
            name = _token_content(config[key])
            return backend.token_to_id(name) if name else None
        ids = _as_id_list(model_config.get(f"{key}_id"))
        return ids[0] if ids else None

    bos_id, eos_id, pad_id = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    if eos_id is None and config_end_ids:
        eos_id = config_end_ids[0]
    if "add_bos_token" in config:
        adds_bos = bool(config["add_bos_token"]) and bos_id is not None
    else:  # follow the post-processor, as transformers does
        adds_bos = bos_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    vocab = backend.get_vocab(with_added_tokens=True)
    return HFTokenizer(
        backend, kind="tokenizers", vocab_size=max(vocab.values()) + 1, bos_id=bos_id, eos_id=eos_id,
        pad_id=pad_id, end_ids=config_end_ids, chat_template=_chat_template(folder, vocab, "tokenizers", model_type),
        token_names=token_names, adds_bos=adds_bos, model_type=model_type)


def _load_sentencepiece(file, folder, model_type, config_end_ids) -> Tokenizer:
    """A sentencepiece model: bos/eos/pad/unk from the model itself."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=file)
    ids = {key: (i if i >= 0 else None) for key, i in
           (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id()),
            ("unk_token", sp.unk_id()))}
    token_names = {key: sp.id_to_piece(i) for key, i in ids.items() if i is not None}
    known_tokens = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    return SentencePieceTokenizer(
        sp, kind="sentencepiece", vocab_size=sp.get_piece_size(), bos_id=ids["bos_token"], eos_id=ids["eos_token"],
        pad_id=ids["pad_token"], end_ids=config_end_ids,
        chat_template=_chat_template(folder, known_tokens, "sentencepiece", model_type),
        token_names=token_names, adds_bos=ids["bos_token"] is not None, model_type=model_type)


def _read_tiktoken_ranks(file: str) -> dict[bytes, int]:
    """Mergeable ranks from a text file of `base64token rank` lines."""
    with open(file, "rb") as f:
        lines = [line.split() for line in f.read().splitlines() if line.strip()]
    try:
        return {base64.b64decode(token): int(rank) for token, rank in lines}
    except (ValueError, binascii.Error) as error:
        raise ValueError(f"{file!r} is not a tiktoken rank file (`base64token rank` per line): {error}") from None


def _tiktoken_encoding(file: str, pattern: str, special_names: list[str]):
    """A tiktoken.Encoding with `special_names` numbered right after the base vocabulary."""
    import tiktoken
    ranks = _read_tiktoken_ranks(file)
    specials = {name: len(ranks) + i for i, name in enumerate(special_names)}
    return tiktoken.Encoding(os.path.basename(file), pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=specials), specials


def _load_llama3_tiktoken(file, folder, model_type, config_end_ids) -> Tokenizer:
    """Meta's Llama 3 tokenizer.model; Llama 3.1+ names (<|eom_id|>, ...) when params.json uses scaled RoPE."""
    is_llama31 = "use_scaled_rope" in _read_json(folder, "params.json")
    encoding, specials = _tiktoken_encoding(file, LLAMA3_PATTERN, LLAMA31_SPECIALS if is_llama31 else LLAMA3_SPECIALS)
    end_ids = [specials[n] for n in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>") if n in specials]
    return TiktokenTokenizer(
        encoding, specials.values(), normalize_nfc=False, chunk_long_text=True, kind="tiktoken",
        vocab_size=encoding.n_vocab, bos_id=specials["<|begin_of_text|>"], eos_id=specials["<|end_of_text|>"],
        pad_id=specials.get("<|finetune_right_pad_id|>"), end_ids=end_ids + config_end_ids,
        chat_template=_chat_template(folder, specials, "tiktoken", model_type),
        token_names={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        adds_bos=True, model_type=model_type)


def _load_qwen1_tiktoken(file, folder, model_type, config_end_ids) -> Tokenizer:
    """Qwen1's qwen.tiktoken: no BOS, <|endoftext|> ends documents, <|im_end|> ends chat turns."""
    encoding, specials = _tiktoken_encoding(file, QWEN1_PATTERN, QWEN1_SPECIALS)
    eos_id = specials["<|endoftext|>"]
    return TiktokenTokenizer(
        encoding, specials.values(), normalize_nfc=True, chunk_long_text=False, kind="qwen_tiktoken",
        vocab_size=encoding.n_vocab, bos_id=None, eos_id=eos_id, pad_id=None,
        end_ids=[eos_id, specials["<|im_end|>"]] + config_end_ids,
        chat_template=_chat_template(folder, specials, "qwen_tiktoken", model_type),
        token_names={"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        adds_bos=False, model_type=model_type)
