"""The memory planner: per-rank bytes of a training run from a config.json and a layout, before a job is queued.

    python -m llama_rlhf.plan --config_file examples/configs/llama-3.1-8b --nproc 8 --model_parallel_size 2
    python -m llama_rlhf.plan --config_file CONFIG --nproc 16 --job grpo --search
    python -m llama_rlhf.plan --table examples/configs/*.json --nproc 8,16,32,64 --job sft,grpo

Pure arithmetic over the config (no weights, no torch): the counts are the ones the code holds.
- Parameters, per rank: this MP rank's shards (vocabulary padded to a multiple of MP; KV heads split or replicated).
- Stage 0: fp32 parameters (the masters), fp32 gradient buckets, both AdamW moments: 16 bytes per parameter, plus,
  under 16-bit autocast, a 16-bit copy of every matmul weight (autocast's cache, held through backward).
  Stage 1: parameters in the compute dtype (fp32 with --dtype float32) in flat buckets padded to a multiple of
  N = DP x SP, fp32 gradient buckets, and 1/N of the fp32 masters (16-bit parameters only) and moments.
  LoRA: the frozen base in the compute dtype (--quantize_base: its decoder linears in int8 / nf4, and each matmul
  keeps its dequantized weight for backward), only the fp32 adapters in the optimizer and the gradient buckets.
- Activations, per layer and token (T = rows x max_seq_len / SP): what autograd saves (two RMSNorms and their
  matmul inputs, q/k/v after RoPE, attention output and its reshaped copy, the log-sum-exp, four MLP tensors);
  with --activation_checkpointing each layer keeps only its input and one layer is recomputed in backward.
- Logits: the LM head runs on trained positions only; cross-entropy keeps the [N, V/MP] logits and writes the
  gradient over them; then the LM head's weight gradient.
- GRPO: the frozen reference (--beta > 0, no LoRA) in the compute dtype, the rollouts' KV cache (rows x
  (max_seq_len + max(32, max_seq_len / 4)) slots, as solver_grpo allocates it), the fp32 logits and the entropy
  temporaries of one row chunk of the update (1 GiB of fp32 logits; chunks are recomputed in backward). With
  shared prompts (one row per prompt and its samples' completions; not under SP) the update's tokens are at most
  the per-sample rows' (the bound above stays), plus the rows' attention masks (shared_prompt_mask_bytes).
  --rollout_dtype / --rollout_quantization int8: the rollout copy (inference/rollout_model.py), held all run:
  every tensor not already in the rollout dtype converted (int8 decoder linears: 1 byte per weight + a 4-byte
  scale per output row of this rank's slice); tensors the policy holds in that form are shared (0 bytes). The
  KV cache is then in the rollout dtype.
- Setup: stage 0 adds the gradient buckets to the loaded fp32 parameters; stage 1 moves the parameters bucket by
  bucket into their new buffers, so the loaded fp32 copy of one bucket is all it holds beyond the training state.
  A 16-bit model (the LoRA base, the GRPO reference) is built in fp32 and cast tensor by tensor.
On the CPU (--device cpu) gloo's collectives add their copies of the buckets in flight, and GRPO's rollouts the
engine's oneDNN-packed copies of the sampling weights (inference/packed.py): during rollouts only, or all run when
those weights are frozen (a LoRA base, the rollout copy: their packed copies are kept between calls).
The peak is the largest of these phases, plus --overhead_gb (CUDA context, communication buffers, allocator
slack: what no tensor accounts for). An impossible layout is the solvers' own error (parallel/layout.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

from .models.config import ConfigError, ModelConfig
from .models.families import config_folder, detect_model_type, get_family
from .parallel.layout import LayoutError, check_model_layout, padded_vocab_size

GB = 1e9  # GPU memory is sold in GB; the tables say so
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
ZERO_STAGES = (0, 1)  # training/distributed_optimizer.py (imports torch; kept equal by tests/test_plan.py)
BUCKET_ELEMS = 32 * 2**20 // 4  # DistributedAdamW's default bucket (32 MB of fp32)
PREFILL_TOKENS = 16384  # generation.PREFILL_TOKENS
GRPO_LOGIT_CHUNK_BYTES = 2**30  # training/logprobs.py LOGIT_CHUNK_BYTES: fp32 logits of one row chunk
SHARED_ROW_TOKENS = 4096  # training/update_batch.py: the longest row of one prompt + its samples' completions
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # models/lora.py
QUANT_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1.0}  # per base parameter (models/quant.py; int8 adds 4 bytes per row)


class PlanError(ValueError):
    """Bad planner input: the message names the flag, the file or the numbers."""


@dataclass
class Layout:
    nproc: int
    mp: int
    sp: int
    dp: int
    zero_stage: int
    activation_checkpointing: bool

    def describe(self) -> str:
        ckpt = " +ckpt" if self.activation_checkpointing else ""
        return f"MP={self.mp} SP={self.sp} DP={self.dp} zero {self.zero_stage}{ckpt}"


@dataclass
class Plan:
    layout: Layout
    job: str
    parts: dict  # name -> bytes per rank
    phases: dict  # phase -> bytes per rank (the peak is their max, plus overhead)
    peak_phase: str
    total: float
    gpu_memory: float
    notes: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(fits=self.fits, total_gb=round(self.total / GB, 3), gpu_memory_gb=self.gpu_memory / GB)
        return d


# -- what one MP rank holds -------------------------------------------------------------------------------
def linear_shapes(cfg: ModelConfig, mp: int) -> dict[str, tuple[int, int, bool]]:
    """Per layer: name -> (in, out) of this rank's weight and whether it is column-parallel (models/transformer)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    kv_parts = mp if cfg.num_kv_heads % mp == 0 else cfg.num_kv_heads
    kv_out = cfg.num_kv_heads // kv_parts * d
    q_out = cfg.num_heads * d // mp
    return {"q_proj": (h, q_out, True), "k_proj": (h, kv_out, True), "v_proj": (h, kv_out, True),
            "o_proj": (q_out, h, False), "gate_proj": (h, f // mp, True), "up_proj": (h, f // mp, True),
            "down_proj": (f // mp, h, False)}


def parameter_counts(cfg: ModelConfig, mp: int) -> dict[str, int]:
    """This MP rank's parameter elements: matmul weights (autocast casts them), embedding, small (norms, biases)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = linear_shapes(cfg, mp)
    matmul = sum(i * o for i, o, _ in shapes.values()) * cfg.num_layers
    vocab_local = padded_vocab_size(cfg.vocab_size, mp) // mp
    embed = vocab_local * h
    if not cfg.tie_word_embeddings:
        matmul += embed  # lm_head
    kv_out = shapes["k_proj"][1]
    bias = (shapes["q_proj"][1] + 2 * kv_out) * cfg.qkv_bias + h * cfg.o_bias + (2 * f // mp + h) * cfg.mlp_bias
    norms = (4 if cfg.sandwich_norm else 2) * h + 2 * d * cfg.qk_norm
    small = (bias + norms) * cfg.num_layers + h
    return {"matmul": matmul, "embedding": embed, "small": small, "total": matmul + embed + small,
            "vocab_local": vocab_local, "tied": cfg.tie_word_embeddings}


def lora_count(cfg: ModelConfig, mp: int, rank: int, targets) -> int:
    """Adapter elements on this MP rank: column-parallel A [r, in] whole, B [out/MP, r]; row-parallel A [r, in/MP],
    B [out, r] whole (issue 14)."""
    return sum((i + o) * rank for name, (i, o, _) in linear_shapes(cfg, mp).items() if name in targets) \
        * cfg.num_layers


def padded(elements: int, n: int) -> int:
    """Stage 1 pads every bucket to a multiple of N: at most N - 1 elements per bucket (plus the MP-partial ones)."""
    if n == 1:
        return elements
    return elements + (math.ceil(elements / BUCKET_ELEMS) + 1) * (n - 1)


def layer_activation_bytes(cfg: ModelConfig, mp: int, c: int) -> float:
    """Bytes autograd keeps per token of one decoder layer (c: compute dtype bytes)."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = linear_shapes(cfg, mp)
    q, kv, fl = shapes["q_proj"][1], shapes["k_proj"][1], shapes["gate_proj"][1]
    heads = q // d
    norms = (4 if cfg.sandwich_norm else 2)
    out = norms * 8 * h + 2 * c * h  # RMSNorm keeps x and x/rms in fp32; the matmuls keep their c-byte inputs
    out += c * (3 * q + 2 * kv) + 4 * heads  # q, k, v after RoPE, attention output + its reshaped copy, lse fp32
    out += 4 * c * fl  # gate, act(gate), up, act(gate) * up
    if cfg.qk_norm:
        out += 8 * (q + kv)
    return out


def lora_activation_bytes(cfg: ModelConfig, mp: int, job, c: int) -> float:
    """Per token and layer: each adapter keeps A x (r values) for B; dropout keeps its output and its mask."""
    out = 0.0
    for name, (i, _, _) in linear_shapes(cfg, mp).items():
        if name in job.lora_target_modules:
            out += job.lora_rank * c + (i * (c + 1) if job.lora_dropout > 0 else 0)
    return out


def _softcap_bytes(cfg: ModelConfig, mp: int, seq_local: int, c: int) -> float:
    """Soft-capped attention (Gemma 2) materialises fp32 scores: per token and head, keys x (tanh + softmax + probs)."""
    if cfg.attn_logit_softcap is None:
        return 0.0
    heads = linear_shapes(cfg, mp)["q_proj"][1] // cfg.head_dim
    return heads * seq_local * (8 + c)


# -- the plan -----------------------------------------------------------------------------------------------
@dataclass
class Job:
    """The solvers' flags that change what a rank holds."""

    job: str = "sft"
    dtype: str = "bfloat16"
    max_seq_len: int = 2048
    max_batch_size: int = 4
    num_samples_per_prompt: int = 8
    max_new_tokens: int = 256
    beta: float = 0.0
    rollout_batch_size: int = 0
    train_batch_size: int = 0
    lora_rank: int = 0
    lora_target_modules: tuple = LORA_TARGETS
    lora_dropout: float = 0.0
    quantize_base: str | None = None  # "int8" | "nf4": the decoder linears of the frozen base (models/quant.py)
    rollout_dtype: str | None = None  # GRPO: the rollout copy's dtype (inference/rollout_model.py)
    rollout_quantization: str | None = None  # GRPO: "int8" decoder linears in the rollout copy
    shared_prompts: bool = True  # GRPO: one update row per prompt and its samples (training/update_batch.py)


CANONICAL_DTYPE = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                   "float16": "float16", "fp16": "float16"}


def rollout_copy_bytes(cfg: ModelConfig, mp: int, job: "Job", source_dtype: str) -> int:
    """Bytes per rank of GRPO's rollout copy (0 without one) of a policy whose tensors are held in
    ``source_dtype``; as inference/rollout_model.RolloutModel.nbytes counts them (tests/test_rollout_precision.py)."""
    if job.job != "grpo" or (job.rollout_dtype is None and not job.rollout_quantization):
        return 0
    r = CANONICAL_DTYPE[job.rollout_dtype or "float32"]
    same = r == CANONICAL_DTYPE[source_dtype]
    counts = parameter_counts(cfg, mp)
    decoder = counts["matmul"] - (0 if counts["tied"] else counts["embedding"])
    rest = counts["total"] - decoder
    converted_rest = 0 if same else rest * DTYPE_BYTES[r]
    if job.rollout_quantization == "int8":
        rows = sum(o for _, o, _ in linear_shapes(cfg, mp).values()) * cfg.num_layers
        return decoder + 4 * rows + converted_rest
    if same or (job.lora_rank > 0 and job.quantize_base):  # sampled as held / the quantized base is shared
        return converted_rest
    return counts["total"] * DTYPE_BYTES[r]


def shared_prompt_mask_bytes(cfg: ModelConfig, layout: "Layout", job: "Job") -> int:
    """GRPO's update with shared prompts (not under SP): per sliding-window setting, the additive attention mask
    [rows, 1, L, L] in the compute dtype that every layer shares, and the boolean one it is built from, for the
    micro-batch's prompt rows (micro-batches are contiguous slices of the rollouts, which come in groups of G)."""
    rows, group = job.train_batch_size or job.max_batch_size * job.num_samples_per_prompt, job.num_samples_per_prompt
    per_prompt = min(group, rows)
    if job.job != "grpo" or not job.shared_prompts or layout.sp > 1 or per_prompt < 2:
        return 0
    aligned = rows % group == 0 or group % rows == 0
    prompt_rows = math.ceil(rows / group) if aligned else math.ceil((rows - 1) / group) + 1
    length = min(SHARED_ROW_TOKENS, job.max_seq_len - job.max_new_tokens + per_prompt * job.max_new_tokens)
    windows = len({cfg.layer_window(i) for i in range(cfg.num_layers)})
    return prompt_rows * length ** 2 * (windows * DTYPE_BYTES[job.dtype] + 1)


def packed_copy_bytes(cfg: ModelConfig, mp: int, job: "Job") -> tuple[int, bool]:
    """CPU GRPO rollouts: bytes per rank of the oneDNN-packed weight copies a ``generate`` call holds
    (inference/packed.py; every dense linear and the LM head in the sampling dtype; int8 / quantized linears are not
    packed, fp16 nothing), and whether they stay between calls (frozen weights: a LoRA base, the rollout copy)."""
    if job.job != "grpo":
        return 0, False
    copy = job.rollout_dtype is not None or bool(job.rollout_quantization)
    dtype = CANONICAL_DTYPE[(job.rollout_dtype or "float32") if copy else job.dtype]
    if dtype == "float16":
        return 0, False
    counts = parameter_counts(cfg, mp)
    decoder = counts["matmul"] - (0 if counts["tied"] else counts["embedding"])
    quantized = job.rollout_quantization == "int8" if copy else bool(job.lora_rank > 0 and job.quantize_base)
    elements = (0 if quantized else decoder) + counts["embedding"]  # the head: vocab_local x hidden, tied or not
    return elements * DTYPE_BYTES[dtype], copy or job.lora_rank > 0


def plan(cfg: ModelConfig, layout: Layout, job: Job, gpu_memory_gb: float = 80.0, overhead_gb: float = 2.0,
         device: str = "cuda") -> Plan:
    """Per-rank bytes of ``job`` at ``layout`` (see the module docstring for what is counted).

    ``device`` "cpu" adds what gloo's collectives allocate (NCCL works in place): a reduce-scatter copies its
    bucket while in flight (all of them by the end of backward), an all-gather its bucket twice."""
    mp, n = layout.mp, layout.dp * layout.sp
    c = DTYPE_BYTES[job.dtype]
    stage = layout.zero_stage
    counts = parameter_counts(cfg, mp)
    notes = []
    lora = job.lora_rank > 0
    decoder = counts["matmul"] - (0 if counts["tied"] else counts["embedding"])  # the layers' linears
    if lora:
        trainable = lora_count(cfg, mp, job.lora_rank, job.lora_target_modules)
        frozen = counts["total"] * c  # the base in the compute dtype (fp32 with --dtype float32)
        if job.quantize_base:
            rows = sum(o for _, o, _ in linear_shapes(cfg, mp).values()) * cfg.num_layers
            frozen += decoder * (QUANT_BYTES[job.quantize_base] - c) + 4 * rows * (job.quantize_base == "int8")
        held = 4  # the adapters stay fp32 (training/setup.py)
        casts = 0
        residual = c  # the 16-bit base's embedding output
    else:
        trainable, frozen = counts["total"], 0
        held = c if stage == 1 and c == 2 else 4  # training/setup.py parameter_dtype
        casts = counts["matmul"] + counts["embedding"] * counts["tied"] if held == 4 and c == 2 else 0
        residual = held if c == 2 else 4
    flat = padded(trainable, n) if stage == 1 else trainable
    parts = {"weights": frozen + flat * held, "gradients": flat * 4}
    if stage == 0:
        parts["optimizer"] = trainable * 8
    else:
        parts["optimizer"] = flat / n * (8 + (4 if held == 2 else 0))
    parts["autocast_copies"] = casts * 2
    source_dtype = job.dtype if (lora or held == 2) else "float32"  # what the policy's tensors are held in
    parts["rollout_copy"] = rollout_copy_bytes(cfg, mp, job, source_dtype)
    persistent = sum(parts.values())

    # training forward/backward of one micro-batch
    seq_local = job.max_seq_len // layout.sp
    if job.job == "sft":
        rows, trained_per_row = job.max_batch_size, seq_local
    else:
        rows = job.train_batch_size or job.max_batch_size * job.num_samples_per_prompt
        trained_per_row = min(job.max_new_tokens, job.max_seq_len) / layout.sp
    tokens, trained = rows * seq_local, rows * trained_per_row
    per_layer = layer_activation_bytes(cfg, mp, c) + _softcap_bytes(cfg, mp, seq_local, c)
    if lora:
        per_layer += lora_activation_bytes(cfg, mp, job, c)
    if layout.activation_checkpointing:
        activations = tokens * (cfg.num_layers * residual * cfg.hidden_size + per_layer)
    else:
        activations = tokens * cfg.num_layers * per_layer
    activations += tokens * 8 * cfg.hidden_size + trained * c * cfg.hidden_size  # final norm, LM-head input
    vocab_local, h = counts["vocab_local"], cfg.hidden_size
    head_grad = vocab_local * h * c * (not lora)  # the LM head's weight gradient (frozen with LoRA)
    if job.job == "sft":  # logits kept in c bytes, then the LM head's weight gradient (cross-entropy's fp32 chunks
        logits = trained * vocab_local * c + head_grad  # of 2^22 elements were never at the peak in measurements)
    else:  # one row chunk at a time (recomputed in backward): fp32 logits / T beside the c-byte ones, 4 fp32
        chunk = min(trained, max(1, GRPO_LOGIT_CHUNK_BYTES // (4 * vocab_local)))  # entropy temporaries
        logits = chunk * vocab_local * max(c + 8, 4 * 5) + head_grad
    if lora and job.quantize_base:  # each matmul keeps its dequantized weight for backward
        per_layer_weights = decoder / cfg.num_layers * c
        activations += per_layer_weights * (1 if layout.activation_checkpointing else cfg.num_layers)
    parts["activations"] = activations
    parts["logits"] = logits
    parts["update_masks"] = shared_prompt_mask_bytes(cfg, layout, job)
    phases = {"train step": persistent + activations + logits + parts["update_masks"]}
    if device == "cpu" and stage == 1 and n > 1:
        parts["gloo_buffers"] = flat * 4
        phases["train step"] += flat * 4
        phases["optimizer step"] = persistent + 2 * held * min(flat, max(BUCKET_ELEMS, counts["embedding"]))

    # setup: stage 0 adds the gradient buckets to the loaded fp32 parameters; stage 1 moves them bucket by bucket
    # into the new buffers (grad_buckets.flatten_parameters), so one bucket's fp32 original is the excess
    max_tensor = max(counts["embedding"], max(i * o for i, o, _ in linear_shapes(cfg, mp).values()))
    biggest_bucket = min(trainable, BUCKET_ELEMS + max_tensor)
    masters = 4 / n if held == 2 else 0
    if stage == 0:
        setup = trainable * 8
    else:
        setup = flat * (held + 4 + masters) + 4 * biggest_bucket
    if lora:  # the base is built in fp32 and cast to the compute dtype one tensor at a time (then quantized)
        setup += counts["total"] * 4 + (c * max_tensor if c != 4 else 0)
    phases["setup"] = setup

    if job.job == "grpo":
        reference = counts["total"] * c if job.beta > 0 and not lora else 0
        parts["reference"] = reference
        if reference:
            phases["setup"] = max(setup, persistent - parts["optimizer"] + counts["total"] * 4 + c * max_tensor)
            phases["train step"] += reference
        kv_heads = linear_shapes(cfg, mp)["k_proj"][1] // cfg.head_dim
        decode_rows = job.rollout_batch_size or job.max_batch_size * job.num_samples_per_prompt
        capacity = job.max_seq_len + max(32, job.max_seq_len // 4)
        kv_bytes = DTYPE_BYTES[job.rollout_dtype or "float32"] if parts["rollout_copy"] else c
        kv_cache = 2 * cfg.num_layers * decode_rows * kv_heads * capacity * cfg.head_dim * kv_bytes
        parts["kv_cache"] = kv_cache
        prompt_tokens = min(PREFILL_TOKENS, job.max_batch_size * max(1, job.max_seq_len - job.max_new_tokens))
        fl = linear_shapes(cfg, mp)["gate_proj"][1]
        prefill = prompt_tokens * (3 * c * fl + 3 * 4 * h)
        phases["rollout"] = persistent + reference + kv_cache + prefill
        if device == "cpu":  # the engine's packed weight copies: during rollouts, or all run for frozen weights
            packed, kept = packed_copy_bytes(cfg, mp, job)
            parts["packed_weights"] = packed
            for phase in phases:
                if phase == "rollout" or (kept and phase != "setup"):
                    phases[phase] += packed
        notes.append(f"rollouts: {decode_rows} sequences decoded together (--rollout_batch_size), "
                     f"{rows} per update micro-batch (--train_batch_size)")
    peak_phase = max(phases, key=phases.get)
    total = phases[peak_phase] + overhead_gb * GB
    parts["overhead"] = overhead_gb * GB
    return Plan(layout, job.job, parts, phases, peak_phase, total, gpu_memory_gb * GB, notes)


# -- layouts --------------------------------------------------------------------------------------------------
def make_layout(cfg: ModelConfig, nproc: int, mp: int, sp: int, zero_stage: int | None,
                activation_checkpointing: bool) -> Layout:
    """The layout the solvers would run, or their own LayoutError / ConfigError."""
    dp = check_model_layout(cfg, nproc, mp, sp)
    if zero_stage is None:  # training/setup.py resolve_zero_stage
        zero_stage = 1 if dp * sp > 1 else 0
    if zero_stage not in ZERO_STAGES:
        raise PlanError(f"--zero_stage must be one of {ZERO_STAGES}, got {zero_stage}")
    return Layout(nproc, mp, sp, dp, zero_stage, activation_checkpointing)


def search(cfg: ModelConfig, nproc: int, job: Job, gpu_memory_gb: float, overhead_gb: float,
           activation_checkpointing: bool | None = None, gpus_per_node: int = 8) -> list[Plan]:
    """Every valid layout of ``nproc`` ranks that fits, best first: MP within a node, no recomputation, the
    least model and sequence parallelism (the fewest collectives per layer), then the least memory."""
    plans = []
    divisors = [k for k in range(1, nproc + 1) if nproc % k == 0]
    for mp in divisors:
        for sp in divisors:
            if nproc % (mp * sp) or job.max_seq_len % (2 * sp) and sp > 1:
                continue
            for ckpt in ((False, True) if activation_checkpointing is None else (activation_checkpointing,)):
                for stage in ZERO_STAGES:
                    try:
                        layout = make_layout(cfg, nproc, mp, sp, stage, ckpt)
                    except (LayoutError, ConfigError):
                        continue
                    if stage == 1 and layout.dp * sp == 1:
                        continue
                    p = plan(cfg, layout, job, gpu_memory_gb, overhead_gb)
                    if p.fits:
                        plans.append(p)
    return sorted(plans, key=lambda p: (p.layout.mp > gpus_per_node, p.layout.activation_checkpointing,
                                        p.layout.mp * p.layout.sp, p.layout.sp, p.total))


# -- reading the config -----------------------------------------------------------------------------------
def read_model_config(config_file: str, model_type: str | None) -> ModelConfig:
    """The ModelConfig the solvers would read from ``config_file`` (a folder or the file; no weights needed)."""
    if not os.path.exists(config_file):
        raise PlanError(f"--config_file {config_file} does not exist")
    if model_type is None:
        if os.path.isfile(config_file) and os.path.basename(config_file) != "config.json":
            model_type = _detect_from_file(config_file)
        else:
            model_type = detect_model_type(config_folder(None, config_file))
    family = get_family(model_type)
    return family.read_config("", config_file)


def _detect_from_file(path: str) -> str:
    """A config saved under another name (examples/configs/NAME.json): detect its family as if it were config.json."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        with open(path, encoding="utf-8") as src, open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as dst:
            dst.write(src.read())
        return detect_model_type(tmp)


# -- output -------------------------------------------------------------------------------------------------
def format_plan(p: Plan, name: str) -> str:
    lines = [f"{name}: {p.job} at {p.layout.describe()} on {p.layout.nproc} ranks, per rank:"]
    for key, value in p.parts.items():
        if value:
            lines.append(f"  {key:<16}{value / GB:>9.2f} GB")
    lines.append("  phases: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in p.phases.items()))
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"  peak ({p.peak_phase} + overhead) {p.total / GB:.2f} GB: {verdict} in "
                 f"{p.gpu_memory / GB:g} GB")
    lines.extend(f"  note: {n}" for n in p.notes)
    return "\n".join(lines)


def table(configs: list[str], nprocs: list[int], jobs: list[str], job: Job, gpu_memory_gb: float,
          overhead_gb: float, model_type: str | None) -> str:
    """Markdown: for each model, job and GPU count, the best layout that fits and its per-rank peak."""
    head = "| model | job | " + " | ".join(f"{k} GPUs" for k in nprocs) + " |"
    lines = [head, "|" + "---|" * (2 + len(nprocs))]
    for path in configs:
        cfg = read_model_config(path, model_type)
        name = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
        for job_name in jobs:
            j = Job(**{**asdict(job), "job": job_name})
            cells = []
            for k in nprocs:
                found = search(cfg, k, j, gpu_memory_gb, overhead_gb)
                cells.append(f"{found[0].layout.describe()}: {found[0].total / GB:.0f} GB" if found else "no fit")
            lines.append(f"| {name} | {job_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m llama_rlhf.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from .cli import add_bool  # torch-free
    p.add_argument("--config_file", help="the model's config.json (or its folder); no weights needed")
    p.add_argument("--ckpt_dir", help="a checkpoint folder (its config.json is read)")
    p.add_argument("--model_type", default=None, help="model family; detected from the config when omitted")
    p.add_argument("--nproc", default="8", help="ranks (GPUs) in the job (--table: a comma list)")
    p.add_argument("--model_parallel_size", type=int, default=1)
    p.add_argument("--sequence_parallel_size", type=int, default=1)
    p.add_argument("--zero_stage", type=int, default=None,
                   help="0 or 1 (default as the solvers: 1 when DP x SP > 1, else 0)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16, float16 or float32")
    p.add_argument("--max_seq_len", type=int, default=2048)
    p.add_argument("--max_batch_size", type=int, default=4, help="sequences (SFT) or prompts (GRPO) per rank")
    add_bool(p, "--activation_checkpointing", False, "recompute each layer in backward")
    p.add_argument("--job", default="sft", help="sft or grpo (--table: a comma list)")
    p.add_argument("--num_samples_per_prompt", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--beta", type=float, default=0.0, help="GRPO KL weight (> 0 keeps a reference model)")
    p.add_argument("--rollout_batch_size", type=int, default=0, help="GRPO: sequences decoded together (0: all)")
    p.add_argument("--train_batch_size", type=int, default=0, help="GRPO: sequences per forward/backward (0: all)")
    p.add_argument("--rollout_dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="GRPO: the rollout copy's dtype (solver_grpo.py)")
    p.add_argument("--rollout_quantization", default="none", choices=("none", "int8"),
                   help="GRPO: int8 decoder linears in the rollout copy")
    p.add_argument("--shared_prompts", default="true", choices=("true", "false"),
                   help="GRPO: one update row per prompt and its samples' completions (solver_grpo.py)")
    p.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora_target_modules", default="all-linear")
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--quantize_base", default=None, choices=("none", "int8", "nf4"), help="QLoRA: the frozen base")
    p.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one GPU (GB)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: count gloo's copies of the gradient buckets in flight (NCCL works in place)")
    p.add_argument("--overhead_gb", type=float, default=2.0,
                   help="per rank beyond the tensors: CUDA context, NCCL buffers, allocator slack (GB)")
    p.add_argument("--search", action="store_true", help="list the layouts of --nproc ranks that fit, best first")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--table", nargs="+", metavar="CONFIG", help="markdown table of the best layouts for these "
                                                                 "configs at each --nproc (a comma list)")
    return p.parse_args(argv)


def _job(args) -> Job:
    if args.dtype not in DTYPE_BYTES:
        raise PlanError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    for name in ("max_seq_len", "max_batch_size", "num_samples_per_prompt", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise PlanError(f"--{name} must be >= 1, got {getattr(args, name)}")
    targets = LORA_TARGETS if args.lora_target_modules == "all-linear" else tuple(args.lora_target_modules.split(","))
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise PlanError(f"--lora_target_modules: unknown {', '.join(unknown)} (valid: all-linear or "
                        f"{','.join(LORA_TARGETS)})")
    quantize = None if args.quantize_base in (None, "none") else args.quantize_base
    if quantize and args.lora_rank < 1:
        raise PlanError(f"--quantize_base {quantize} quantizes a frozen base: it needs --lora_rank")
    rollout_quant = None if args.rollout_quantization in (None, "none") else args.rollout_quantization
    if rollout_quant and quantize:
        raise PlanError(f"--rollout_quantization {rollout_quant} with --quantize_base {quantize}: the base is already "
                        "quantized and rollouts sample from it; drop one")
    return Job(args.job, args.dtype, args.max_seq_len, args.max_batch_size, args.num_samples_per_prompt,
               args.max_new_tokens, args.beta, args.rollout_batch_size, args.train_batch_size, args.lora_rank,
               targets, args.lora_dropout, quantize, args.rollout_dtype, rollout_quant, args.shared_prompts == "true")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        nprocs = [int(k) for k in args.nproc.split(",")]
    except ValueError:
        raise PlanError(f"--nproc must be a number (a comma list with --table), got {args.nproc!r}") from None
    if any(k < 1 for k in nprocs) or (len(nprocs) > 1 and not args.table):
        raise PlanError(f"--nproc {args.nproc}: one positive number (a comma list only with --table)")
    args.nproc = nprocs[0]
    if args.table:
        print(table(args.table, nprocs, args.job.split(","), _job(args), args.gpu_memory_gb, args.overhead_gb,
                    args.model_type))
        return 0
    if args.job not in ("sft", "grpo"):
        raise PlanError(f"--job must be sft or grpo, got {args.job!r}")
    source = args.config_file or args.ckpt_dir
    if not source:
        raise PlanError("pass --config_file (a config.json or its folder) or --ckpt_dir")
    cfg = read_model_config(source, args.model_type)
    job = _job(args)
    name = os.path.basename(os.path.normpath(source))
    if args.search:
        found = search(cfg, args.nproc, job, args.gpu_memory_gb, args.overhead_gb)
        if args.json:
            print(json.dumps({"config": source, "nproc": args.nproc, "layouts": [p.to_dict() for p in found]}))
        elif not found:
            print(f"{name}: no layout of {args.nproc} ranks fits {job.job} in {args.gpu_memory_gb:g} GB per GPU")
        else:
            print(f"{name}: {job.job} layouts of {args.nproc} ranks that fit in {args.gpu_memory_gb:g} GB, best first:")
            for p in found:
                print(f"  {p.layout.describe():<28} peak {p.total / GB:7.2f} GB ({p.peak_phase})")
        return 0 if found else 1
    layout = make_layout(cfg, args.nproc, args.model_parallel_size, args.sequence_parallel_size, args.zero_stage,
                         args.activation_checkpointing)
    p = plan(cfg, layout, job, args.gpu_memory_gb, args.overhead_gb, args.device)
    print(json.dumps({"config": source, **p.to_dict()}) if args.json else format_plan(p, name))
    if not p.fits:
        print(f"error: {name} does not fit: {job.job} at {layout.describe()} needs {p.total / GB:.2f} GB per rank "
              f"({p.peak_phase}), --gpu_memory_gb is {args.gpu_memory_gb:g}; try --search", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (PlanError, ConfigError, LayoutError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
