"""Meta original checkpoints (Llama 2 / Llama 3): params.json + consolidated.NN.pth model-parallel shards.

Meta saved one file per fairscale model-parallel rank. Column-parallel weights (wq, wk, wv, w1, w3, output)
are split on dim 0, row-parallel ones (wo, w2) on dim 1, the embedding on dim 1 (Llama 2's ParallelEmbedding)
or dim 0 (Llama 3's VocabParallelEmbedding), and norms are replicated. ``MetaSource`` presents the shards as
one tensor source with HF key names: a read of rows [start, stop) along any dim takes just those pieces from
the (memory-mapped) shards, so checkpoint/load.py re-slices any source shard count into any target MP.
Meta's RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...; ours rotates halves, so wq/wk rows are
permuted within each head on the way in.
"""
from __future__ import annotations

import os
import re
import warnings

import torch

from ..models.config import ConfigError, ModelConfig, require
from .hf import CheckpointError

META_TOKENIZER_KINDS = {"llama": "sentencepiece", "llama3": "tiktoken"}
# Llama 2's reference code has no rope_theta: its base is fixed at 10000 (Code Llama states 1e6 in params.json).
# Llama 3 params.json always state it; if one does not, Meta's Llama 3 ModelArgs default is used with a warning.
LLAMA2_THETA, LLAMA3_DEFAULT_THETA = 10000.0, 500000.0
# Context lengths the released models were trained for (params.json does not say).
DEFAULT_CONTEXT = {"llama": 4096, "llama3": 8192, "llama3_scaled": 131072}
# Meta's apply_scaling constants for use_scaled_rope (Llama 3.1+). Llama 3.2 1B/3B were trained with factor 32
# (their HF config.json; Meta confirmed it in meta-llama/llama-models#166), while the reference code kept 8.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
LLAMA32_SMALL = {(2048, 16), (3072, 28)}  # (dim, n_layers) of Llama 3.2 1B and 3B

# Meta key -> (HF key, fairscale split dim or "embedding" (inferred from shapes) or None (replicated), permute)
_RULES = [
    (r"tok_embeddings\.weight", "model.embed_tokens.weight", "embedding", False),
    (r"norm\.weight", "model.norm.weight", None, False),
    (r"output\.weight", "lm_head.weight", 0, False),
    (r"layers\.(\d+)\.attention\.wq\.weight", r"model.layers.\1.self_attn.q_proj.weight", 0, True),
    (r"layers\.(\d+)\.attention\.wk\.weight", r"model.layers.\1.self_attn.k_proj.weight", 0, True),
    (r"layers\.(\d+)\.attention\.wv\.weight", r"model.layers.\1.self_attn.v_proj.weight", 0, False),
    (r"layers\.(\d+)\.attention\.wo\.weight", r"model.layers.\1.self_attn.o_proj.weight", 1, False),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight", 0, False),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight", 0, False),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight", 1, False),
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight", None, False),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight", None, False),
]
_RULES = [(re.compile(pattern + "$"), hf, dim, permute) for pattern, hf, dim, permute in _RULES]
IGNORED_META_KEYS = ("rope.freqs",)  # a precomputed RoPE table some releases carry


def meta_ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def is_tiktoken_file(path: str) -> bool:
    """A Llama 3 tokenizer.model is text (`base64token rank` lines); Llama 2's is a sentencepiece protobuf."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        first = f.readline(4096).split()
    return len(first) == 2 and first[1].isdigit()


def shard_files(ckpt_dir: str) -> list[str]:
    """consolidated.00.pth ... consolidated.NN.pth, all present and numbered without gaps."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory does not exist: {ckpt_dir}")
    found = {}
    for name in os.listdir(ckpt_dir):
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", name)
        if m:
            found[int(m.group(1))] = os.path.join(ckpt_dir, name)
    if not found:
        raise CheckpointError(f"no Meta weights in {ckpt_dir}: expected consolidated.00.pth (and .01, ... for "
                              f"model-parallel shards)")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise CheckpointError(f"Meta checkpoint {ckpt_dir} is incomplete: consolidated."
                              f"{', consolidated.'.join(f'{i:02d}' for i in missing)}.pth missing "
                              f"(found {len(found)} of {max(found) + 1} shards)")
    return [found[i] for i in sorted(found)]


def _first_shard_keys(ckpt_dir: str) -> set[str]:
    return set(torch.load(shard_files(ckpt_dir)[0], map_location="cpu", weights_only=True, mmap=True))


def _tokenizer_vocab(ckpt_dir: str, model_type: str, source: str, vocab_size) -> int:
    path = os.path.join(ckpt_dir, "tokenizer.model") if ckpt_dir else "tokenizer.model"
    if not os.path.isfile(path):
        raise ConfigError(f"{source} has vocab_size {vocab_size}, so the vocabulary size comes from the tokenizer, "
                          f"but the tokenizer file {path} does not exist")
    from ..tokenizer import load_tokenizer
    return int(load_tokenizer(path, kind=META_TOKENIZER_KINDS[model_type], model_type=model_type).vocab_size)


def _check_tokenizer_kind(ckpt_dir: str, model_type: str) -> None:
    """Llama 2 originals ship a sentencepiece tokenizer.model, Llama 3 a tiktoken one: a mismatch means the
    wrong --model_type."""
    path = os.path.join(ckpt_dir, "tokenizer.model")
    if not ckpt_dir or not os.path.isfile(path):
        return
    tiktoken = is_tiktoken_file(path)
    if model_type == "llama" and tiktoken:
        raise ConfigError(f"{path} is a tiktoken (Llama 3) tokenizer, so this is a Llama 3 original: "
                          f"use --model_type llama3, not llama")
    if model_type == "llama3" and not tiktoken:
        raise ConfigError(f"{path} is a sentencepiece (Llama 2) tokenizer, so this is a Llama 2 original: "
                          f"use --model_type llama, not llama3")


def meta_config(d: dict, source: str, model_type: str, ckpt_dir: str = "") -> ModelConfig:
    """ModelConfig from Meta's params.json (the fields of ModelArgs in Meta's model.py)."""
    _check_tokenizer_kind(ckpt_dir, model_type)
    dim = int(require(d, "dim", source))
    n_heads = int(require(d, "n_heads", source))
    n_layers = int(require(d, "n_layers", source))
    vocab = d.get("vocab_size", -1)
    if vocab is None or int(vocab) <= 0:
        vocab = _tokenizer_vocab(ckpt_dir, model_type, source, vocab)
    theta = d.get("rope_theta")
    if theta is None and model_type == "llama":
        theta = LLAMA2_THETA
    elif theta is None:
        theta = LLAMA3_DEFAULT_THETA
        warnings.warn(f"{source}: no rope_theta; using {theta:g}, Meta's Llama 3 ModelArgs default")
    scaling, context = None, DEFAULT_CONTEXT[model_type]
    if d.get("use_scaled_rope"):
        scaling = dict(LLAMA3_SCALING)
        if (dim, n_layers) in LLAMA32_SMALL:
            scaling["factor"] = 32.0
        if d.get("rope_scaling_factor") is not None:
            scaling["factor"] = float(d["rope_scaling_factor"])
        if d.get("rope_high_freq_factor") is not None:
            scaling["high_freq_factor"] = float(d["rope_high_freq_factor"])
        context = DEFAULT_CONTEXT["llama3_scaled"]
    tied = bool(ckpt_dir) and "output.weight" not in _first_shard_keys(ckpt_dir)
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(vocab),
        hidden_size=dim,
        intermediate_size=meta_ffn_size(dim, int(require(d, "multiple_of", source)), d.get("ffn_dim_multiplier")),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=int(d.get("n_kv_heads") or n_heads),
        head_dim=dim // n_heads,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(require(d, "norm_eps", source)),
        max_position_embeddings=int(d.get("max_position_embeddings") or context),
        tie_word_embeddings=tied,
    )


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from Meta's interleaved RoPE pairs to rotate-half: [H*D, ...] -> same shape."""
    rest = w.shape[1:]
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


class MetaSource:
    """Meta's consolidated.NN.pth shards (memory-mapped) as one tensor source with HF key names."""

    def __init__(self, files: list[str], cfg: ModelConfig):
        self._files = files
        self._shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
        keys = set(self._shards[0])
        for path, shard in zip(files[1:], self._shards[1:]):
            if set(shard) != keys:
                diff = sorted(keys.symmetric_difference(shard))
                raise CheckpointError(f"Meta shards disagree on their keys: {files[0]} vs {path} differ in "
                                      f"{', '.join(diff[:6])}")
        self._entries: dict[str, tuple] = {}  # HF key -> (meta key, split dim, heads to permute or 0)
        for meta_key in sorted(keys):
            if meta_key in IGNORED_META_KEYS:
                continue
            hf_key, split, heads = meta_key, None, 0
            for pattern, hf_name, dim, permute in _RULES:
                if pattern.match(meta_key):
                    hf_key, split = pattern.sub(hf_name, meta_key), dim
                    heads = (cfg.num_heads if ".wq." in meta_key else cfg.num_kv_heads) if permute else 0
                    break
            if split == "embedding":
                split = self._embedding_split(meta_key, cfg.hidden_size)
            self._check_shapes(meta_key, split)
            self._entries[hf_key] = (meta_key, split, heads)

    def _embedding_split(self, meta_key: str, hidden: int) -> int | None:
        """Llama 2 splits the embedding on dim 1 (hidden), Llama 3 on dim 0 (vocab): tell them by shape."""
        if len(self._shards) == 1:
            return None
        width = self._shards[0][meta_key].shape[1]
        return 0 if width == hidden else 1

    def _check_shapes(self, meta_key: str, split: int | None) -> None:
        shapes = [tuple(s[meta_key].shape) for s in self._shards]
        for path, shape in zip(self._files, shapes):
            same = [d for d in range(len(shape)) if d != split]
            if len(shape) != len(shapes[0]) or any(shape[d] != shapes[0][d] for d in same):
                raise CheckpointError(f"Meta shard {path}: {meta_key} has shape {list(shape)}, inconsistent with "
                                      f"{list(shapes[0])} in {self._files[0]} (split dim {split})")

    def keys(self) -> set[str]:
        return set(self._entries)

    def shape(self, key: str) -> tuple:
        meta_key, split, _ = self._entries[key]
        shape = list(self._shards[0][meta_key].shape)
        if split is not None:
            shape[split] = sum(s[meta_key].shape[split] for s in self._shards)
        return tuple(shape)

    def _read_meta(self, meta_key: str, split, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along ``dim`` (None: all) of the merged tensor, touching only those pieces."""
        parts = [s[meta_key] for s in self._shards]
        if split is None:
            return (parts[0] if dim is None else parts[0].narrow(dim, start, stop - start)).clone()
        if dim is None:
            return torch.cat(parts, split)
        if dim != split:
            return torch.cat([p.narrow(dim, start, stop - start) for p in parts], split)
        pieces, offset = [], 0
        for p in parts:
            lo, hi = max(start, offset), min(stop, offset + p.shape[split])
            if lo < hi:
                pieces.append(p.narrow(split, lo - offset, hi - lo))
            offset += p.shape[split]
        return torch.cat(pieces, split)

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        meta_key, split, heads = self._entries[key]
        full = self.shape(key)
        stop = full[dim] if dim is not None and stop is None else stop
        if not heads:
            return self._read_meta(meta_key, split, dim, start, stop)
        head_dim = full[0] // heads
        if dim != 0:  # the permutation is within rows: read every row, permute, keep the columns asked for
            return interleaved_to_half(self._read_meta(meta_key, split, dim, start, stop), heads)
        first, last = start // head_dim, -(-stop // head_dim)  # whole heads covering [start, stop)
        rows = self._read_meta(meta_key, split, 0, first * head_dim, last * head_dim)
        rows = interleaved_to_half(rows, last - first)
        return rows[start - first * head_dim: stop - first * head_dim].clone()

    def close(self):
        self._shards.clear()


def open_meta_checkpoint(ckpt_dir: str, cfg: ModelConfig) -> MetaSource:
    """A tensor source over a Meta original checkpoint directory (any number of consolidated shards)."""
    return MetaSource(shard_files(ckpt_dir), cfg)
