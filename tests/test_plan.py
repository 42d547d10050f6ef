"""The memory planner (python -m llama_rlhf.plan) against what the training step really holds, and its bad input.

Planner vs measurement (one gloo world of 2, the solvers' own SFT step: sft.train_step with DistributedAdamW): the
measured per-rank peak is the bytes the optimizer holds at the start of a step (memory_breakdown: every parameter,
gradient, master and moment storage) plus the peak of the tensor allocations the step makes on top of them
(torch.profiler's memory events), i.e. what CUDA's max_memory_allocated reports on a GPU; the optimizer's
construction (with the model's fp32 parameters before it) is profiled the same way against the planner's setup
phase. The CPU's resident set is not the reference: it adds BLAS packing buffers and freed heap kept for reuse.
Three configurations: a tiny Llama at (MP=2, DP=1) stage 0 fp32; SmolLM2-135M's architecture at (MP=1, DP=2)
stage 1 bf16; the tiny Llama at (MP=1, DP=2) stage 0 bf16 with activation checkpointing; and LoRA (r=8, all linears,
bf16 base) on the tiny Llama at (MP=1, DP=2) stage 1. Each within 15%.
Also: the command (JSON, about a second, no torch), --search, the README tables, bad input (one line, non-zero),
and the CPU peak metric (VmHWM, not the ru_maxrss a worker inherits from its launcher).
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from llama_rlhf import plan as planner
from llama_rlhf.models.config import ModelConfig
from tests.distributed import assert_check, grid, run_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 0.15
TINY = dict(model_type="llama-hf", vocab_size=49152, hidden_size=128, intermediate_size=512, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-5,
            max_position_embeddings=1024)
SMOLLM2 = dict(model_type="llama-hf", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
               num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
               max_position_embeddings=8192, tie_word_embeddings=True)
CASES = [  # name, config, MP, stage, dtype, seq, rows, activation checkpointing
    ("tiny_mp2_stage0_fp32", TINY, 2, 0, "float32", 512, 2, False),
    ("smollm2_dp2_stage1_bf16", SMOLLM2, 1, 1, "bfloat16", 128, 1, False),
    ("tiny_dp2_stage0_bf16_ckpt", TINY, 1, 0, "bfloat16", 512, 2, True),
    ("tiny_lora_dp2_stage1_bf16", TINY, 1, 1, "bfloat16", 512, 2, False),  # LoRA r=8 on all linears, bf16 base
]
LORA_RANK = 8


def profiled_peak(step) -> tuple[float, float]:
    """(peak of live tensor bytes a call adds, bytes it leaves) from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return float(peak), float(live)


def check_case(out_dir, case):
    from llama_rlhf.data import Row
    from llama_rlhf.models.lora import LoRASpec, apply_lora, freeze_base
    from llama_rlhf.models.pretrained import build_model
    from llama_rlhf.training.distributed_optimizer import DistributedAdamW
    from llama_rlhf.training.setup import parameter_dtype
    from llama_rlhf.training.sft import train_step
    name, config, mp, stage, dtype_name, seq, rows, ckpt = case
    ps = grid(mp, 1)
    dtype = getattr(torch, dtype_name)
    cfg = ModelConfig(**config)
    t0 = time.time()
    built = []

    lora = "lora" in name

    def setup():  # the model's fp32 parameters, then the optimizer over them (profiled together: frees of
        model = build_model(cfg, ps, dtype if lora else torch.float32)  # storages made earlier go unseen)
        with torch.no_grad():  # any finite values take the same memory (init_weights draws full tensors: slow)
            for p in model.parameters():
                p.fill_(0.02)
        if lora:  # as training/lora_run.py: adapters (fp32) on the frozen 16-bit base
            apply_lora(model, LoRASpec(LORA_RANK, 16.0), seed=1)
            freeze_base(model, dtype)
        built.extend([model, DistributedAdamW(model, ps, stage=stage, lr=1e-4, param_dtype=torch.float32 if lora
                                              else parameter_dtype(stage, dtype))])

    setup_measured, _ = profiled_peak(setup)
    model, opt = built
    model.activation_checkpointing = ckpt
    model.train()
    g = torch.Generator().manual_seed(ps.dp_rank)
    batch = [Row(torch.randint(0, cfg.vocab_size, (seq,), generator=g).tolist(),
                 torch.randint(0, cfg.vocab_size, (seq,), generator=g).tolist(), list(range(seq)), [0] * seq)
             for _ in range(rows)]
    total = rows * seq * ps.dp_size

    def step():
        train_step(model, opt, [batch], total, ps, dtype, 0, 1.0, False)

    step()  # the moments exist from the first step on
    held = sum(v for k, v in opt.memory_breakdown(model).items() if k != "trainable_parameters")
    added, left = profiled_peak(step)
    measured = held + added
    layout = planner.make_layout(cfg, ps.world_size, mp, 1, stage, ckpt)
    job = planner.Job("sft", dtype_name, seq, rows, lora_rank=LORA_RANK if lora else 0)
    p = planner.plan(cfg, layout, job, overhead_gb=0.0, device="cpu")
    planned = max(p.phases["train step"], p.phases.get("optimizer step", 0))
    error = planned / measured - 1
    setup_planned = p.phases["setup"]
    setup_error = setup_planned / setup_measured - 1
    if ps.rank == 0:
        with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump({"case": name, "layout": layout.describe(), "planned_mb": planned / 2**20,
                       "measured_mb": measured / 2**20, "held_mb": held / 2**20, "step_adds_mb": added / 2**20,
                       "left_after_step_mb": left / 2**20, "error": error,
                       "setup_planned_mb": setup_planned / 2**20, "setup_measured_mb": setup_measured / 2**20,
                       "setup_error": setup_error,
                       "planned_parts_mb": {k: v / 2**20 for k, v in p.parts.items()},
                       "seconds": time.time() - t0}, f)
    assert abs(error) <= TOLERANCE, f"{name}: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    assert abs(setup_error) <= TOLERANCE, \
        f"{name} setup: planned {setup_planned / 2**20:.1f} MiB, measured {setup_measured / 2**20:.1f} MiB"
    del model, opt, built


def tiny_mp2_stage0_fp32(out_dir):
    check_case(out_dir, CASES[0])


def smollm2_dp2_stage1_bf16(out_dir):
    check_case(out_dir, CASES[1])


def tiny_dp2_stage0_bf16_ckpt(out_dir):
    check_case(out_dir, CASES[2])


def tiny_lora_dp2_stage1_bf16(out_dir):
    check_case(out_dir, CASES[3])


CHECKS = [tiny_mp2_stage0_fp32, smollm2_dp2_stage1_bf16, tiny_dp2_stage0_bf16_ckpt, tiny_lora_dp2_stage1_bf16]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("plan"))
    return run_checks(2, CHECKS, out_dir), out_dir


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_planner_matches_measured_peak(report, case):
    results, out_dir = report
    path = os.path.join(out_dir, f"{case}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        print(f"{case} ({r['layout']}): planned {r['planned_mb']:.1f} MiB, measured {r['measured_mb']:.1f} MiB "
              f"(held {r['held_mb']:.1f} + step {r['step_adds_mb']:.1f}), error {100 * r['error']:+.1f}%; optimizer "
              f"setup planned {r['setup_planned_mb']:.1f} MiB, measured {r['setup_measured_mb']:.1f} MiB, error "
              f"{100 * r['setup_error']:+.1f}%")
    assert_check(results, case)


# -- the command line -----------------------------------------------------------------------------------------
def run_plan(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llama_rlhf.plan", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


CONFIGS = os.path.join(ROOT, "examples", "configs")


def test_plan_command_is_quick_json_and_torch_free():
    t = time.time()
    proc = run_plan("--config_file", os.path.join(CONFIGS, "llama-3.1-8b.json"), "--nproc", "8",
                    "--model_parallel_size", "2", "--max_seq_len", "4096", "--max_batch_size", "1", "--json")
    elapsed = time.time() - t
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["layout"] == {"nproc": 8, "mp": 2, "sp": 1, "dp": 4, "zero_stage": 1, "activation_checkpointing": False}
    # Llama-3.1-8B: 8.03e9 parameters; MP=2 holds half the matmuls (vocab 128256 / 2 each for embedding and head)
    p = planner.parameter_counts(planner.read_model_config(os.path.join(CONFIGS, "llama-3.1-8b.json"), None), 2)
    assert abs(2 * p["total"] - 8.03e9) / 8.03e9 < 0.01
    assert d["parts"]["weights"] == pytest.approx(2 * planner.padded(p["total"], 4))  # bf16 at stage 1
    assert d["parts"]["optimizer"] == pytest.approx(12 * planner.padded(p["total"], 4) / 4)
    assert elapsed < 10, elapsed
    code = "import sys, llama_rlhf.plan; assert 'torch' not in sys.modules, 'the planner imported torch'"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode == 0


def test_parameter_count_matches_the_model():
    from llama_rlhf.models.pretrained import build_model
    from llama_rlhf.parallel.state import single_process_state
    for config in (TINY, dict(TINY, tie_word_embeddings=True, qk_norm=True, qkv_bias=True)):
        cfg = ModelConfig(**dict(config, hidden_size=32, intermediate_size=64, vocab_size=97, head_dim=8))
        model = build_model(cfg, single_process_state())
        assert planner.parameter_counts(cfg, 1)["total"] == sum(p.numel() for p in model.parameters())


def test_constants_agree_with_the_code():
    from llama_rlhf.inference.engine import PREFILL_TOKENS
    from llama_rlhf.training.distributed_optimizer import ZERO_STAGES
    from llama_rlhf.training.logprobs import LOGIT_CHUNK_BYTES
    assert planner.ZERO_STAGES == ZERO_STAGES and planner.PREFILL_TOKENS == PREFILL_TOKENS
    assert planner.GRPO_LOGIT_CHUNK_BYTES == LOGIT_CHUNK_BYTES
    from llama_rlhf.training.update_batch import SHARED_ROW_TOKENS
    assert planner.SHARED_ROW_TOKENS == SHARED_ROW_TOKENS


def test_search_lists_fitting_layouts_best_first():
    proc = run_plan("--config_file", os.path.join(CONFIGS, "llama-3.1-8b.json"), "--nproc", "8", "--search",
                    "--max_seq_len", "4096", "--max_batch_size", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    layouts = json.loads(proc.stdout)["layouts"]
    assert layouts and all(p["fits"] for p in layouts)
    assert all(p["layout"]["mp"] * p["layout"]["sp"] * p["layout"]["dp"] == 8 for p in layouts)
    first = layouts[0]["layout"]
    assert first["mp"] <= 8 and not first["activation_checkpointing"]


@pytest.mark.parametrize("args, message", [
    (["--config_file", "/nonexistent/config.json"], "--config_file /nonexistent/config.json does not exist"),
    (["--config_file", "llama-3.1-8b.json", "--nproc", "6", "--model_parallel_size", "4"],
     "world size 6 is not divisible by --model_parallel_size 4"),
    (["--config_file", "llama-3.1-8b.json", "--nproc", "6", "--model_parallel_size", "3"],
     "num_attention_heads 32 is not divisible by --model_parallel_size 3"),
    (["--config_file", "llama-3-70b.json", "--nproc", "8", "--zero_stage", "0"], "llama-3-70b.json does not fit"),
    (["--config_file", "llama-3.1-8b.json", "--zero_stage", "2"], "--zero_stage must be one of (0, 1), got 2"),
])
def test_bad_input_is_one_line_and_non_zero(args, message):
    args = [os.path.join(CONFIGS, a) if a.endswith(".json") and not a.startswith("/") else a for a in args]
    proc = run_plan(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    if "does not fit" in message:
        assert "GB per rank" in lines[0]


def test_cpu_peak_memory_is_the_process_own():
    """A worker's peak (metrics.peak_memory_mb on the CPU) is its own VmHWM: getrusage's ru_maxrss would report at
    least the resident set of the process that started it (Linux carries it across fork + exec)."""
    ballast = b"\x01" * (1536 * 2**20)  # the launcher holds 1.5 GiB
    code = ("import resource, torch; from llama_rlhf.training.metrics import local_peak_memory_mb; "
            "print(local_peak_memory_mb(torch.device('cpu')), "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    del ballast
    assert out.returncode == 0, out.stderr
    own, inherited = (float(v) for v in out.stdout.split())
    assert inherited > 1536, "ru_maxrss no longer carries the launcher's peak: the check cannot tell the two apart"
    assert own < 1024, f"the worker reports {own:.0f} MB, its launcher's 1.5 GiB included"


def test_readme_what_fits_tables_are_the_planner_output():
    """The README's tables are what the commands printed above them print today."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## What fits"):readme.index("## Performance")]
    commands = [block.split("```", 1)[0] for block in section.split("```bash\n")[1:]]
    tables = [c for c in commands if "--table" in c]
    assert len(tables) == 2
    for command in tables:
        args = command.replace("\\\n", " ").split()[3:]  # after "python -m llama_rlhf.plan"
        proc = run_plan(*args)
        assert proc.returncode == 0, proc.stderr
        for row in proc.stdout.strip().splitlines():
            assert row in section, f"README's What fits table is stale: {row}"


def test_cpu_packed_weight_copies_are_what_packing_allocates():
    """--device cpu GRPO: the planner's packed_weights part equals the bytes packed_weights() allocates for the
    tiny Llama (block-aligned shapes) in fp32, and follows the sampling weights: int8 rollout linears leave the head
    only, fp16 packs nothing, frozen weights (LoRA, a rollout copy) keep theirs through the train step."""
    from llama_rlhf.inference.packed import packed_weights
    from llama_rlhf.models.pretrained import build_model
    from llama_rlhf.parallel.state import single_process_state
    cfg = ModelConfig(**TINY)
    model = build_model(cfg, single_process_state(), torch.float32)
    entered = []

    def enter():
        block = packed_weights(model, torch.float32, rows=8)
        block.__enter__()
        entered.append(block)

    _, left = profiled_peak(enter)
    entered[0].__exit__(None, None, None)
    job = planner.Job("grpo", "float32", 256, 2, 4, 64)
    planned, kept = planner.packed_copy_bytes(cfg, 1, job)
    assert not kept and abs(planned / left - 1) < 0.01, (planned, left)
    h, vocab = cfg.hidden_size, cfg.vocab_size
    decoder = (h * 128 + 2 * h * 64 + 128 * h + 3 * h * 512) * cfg.num_layers  # q, k, v, o, gate, up, down
    assert planned == 4 * (decoder + vocab * h)  # by hand
    layout = planner.make_layout(cfg, 1, 1, 1, 0, False)
    p = planner.plan(cfg, layout, job, overhead_gb=0.0, device="cpu")
    q = planner.plan(cfg, layout, job, overhead_gb=0.0, device="cuda")
    assert p.phases["rollout"] - q.phases["rollout"] == planned and p.phases["train step"] == q.phases["train step"]
    int8 = planner.Job("grpo", "float32", 256, 2, 4, 64, rollout_quantization="int8")
    assert planner.packed_copy_bytes(cfg, 1, int8) == (4 * vocab * h, True)
    bf16_copy = planner.Job("grpo", "float32", 256, 2, 4, 64, rollout_dtype="bfloat16")
    assert planner.packed_copy_bytes(cfg, 1, bf16_copy) == (2 * (decoder + vocab * h), True)
    assert planner.packed_copy_bytes(cfg, 1, planner.Job("grpo", "float16", 256, 2, 4, 64)) == (0, False)
    lora = planner.Job("grpo", "bfloat16", 256, 2, 4, 64, lora_rank=8)
    p = planner.plan(cfg, layout, lora, overhead_gb=0.0, device="cpu")
    q = planner.plan(cfg, layout, lora, overhead_gb=0.0, device="cuda")
    assert p.phases["train step"] - q.phases["train step"] == 2 * (decoder + vocab * h), "kept through training"


def test_shared_prompt_masks_are_what_the_update_builds(monkeypatch):
    from llama_rlhf.models import transformer
    from llama_rlhf.models.pretrained import build_model
    from llama_rlhf.parallel.state import single_process_state
    from llama_rlhf.training.grpo import Prompt, Rollout
    from llama_rlhf.training.update_batch import completion_batch
    import dataclasses
    cfg = dataclasses.replace(ModelConfig(**TINY), sliding_window=6, sliding_window_layers=[True, False])
    job = planner.Job("grpo", "float32", 24, 2, 4, 8)  # the longest prompts (16) and completions (8)
    rollouts = [Rollout(Prompt(p, [p + 1] * 16, {}), s, [7] * 8, "length", []) for p in range(2) for s in range(4)]
    made = []
    real = transformer.additive_mask
    monkeypatch.setattr(transformer, "additive_mask", lambda m, dtype: made.append(real(m, dtype)) or made[-1])
    batch = completion_batch(rollouts, 0, ())
    with torch.no_grad():
        build_model(cfg, single_process_state())(batch["input_ids"], position_ids=batch["position_ids"],
                                                 branches=batch["branches"], hidden_only=True)
    layout = planner.make_layout(cfg, 1, 1, 1, 0, False)
    held = sum(m.numel() * m.element_size() for m in made) + made[0].numel()  # + one boolean mask being converted
    assert len(made) == 2 and made[0].shape == (2, 1, 48, 48)
    assert planner.shared_prompt_mask_bytes(cfg, layout, job) == held == 2 * 48 ** 2 * (2 * 4 + 1)
    assert planner.shared_prompt_mask_bytes(cfg, layout, dataclasses.replace(job, shared_prompts=False)) == 0
    misaligned = dataclasses.replace(job, train_batch_size=3)  # a slice of 3 spans up to 2 prompts, rows of <= 3
    assert planner.shared_prompt_mask_bytes(cfg, layout, misaligned) == 2 * (16 + 3 * 8) ** 2 * (2 * 4 + 1)
