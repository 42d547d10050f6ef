"""The benchmark harness's plumbing on tiny inputs: the communication counter (against hand-made calls and the
Megatron per-layer counts), the FLOP formula, the GEMM timer, the MP refusal, the GRPO prompt files, and the
results writer (summary, targets, markdown, JSON, PNG). The benchmarks themselves are not run here.
"""
import json
import os
import re

import pytest
import torch
import torch.distributed as dist

from benchmarks import comm, dpo_step, grpo_step, load, mfu, run
from tests.distributed import assert_check, grid, run_checks


# --------------------------------------------------------------------------------------------------------
# communication counter (world of 2)
# --------------------------------------------------------------------------------------------------------

def check_counter_records_known_calls():
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    real_all_reduce = dist.all_reduce
    with comm.CommCounter() as counter:
        dist.all_reduce(torch.ones(3, 4))  # 48 bytes
        parts = [torch.empty(5, dtype=torch.float64) for _ in range(2)]
        dist.all_gather(parts, torch.full((5,), float(rank), dtype=torch.float64))  # 40 bytes contributed
        counter.phase = "backward"
        received = torch.empty(6)
        requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((6,), float(rank)), peer, tag=7),
                                           dist.P2POp(dist.irecv, received, peer, tag=7)])
        for request in requests:
            request.wait()
    assert dist.all_reduce is real_all_reduce, "the counter must restore torch.distributed on exit"
    assert received.eq(float(peer)).all() and parts[peer].eq(float(peer)).all(), "wrapped calls must still work"
    got = [(e.phase, e.op, e.bytes, e.group_size, e.tag) for e in counter.events]
    assert got == [("forward", "all_reduce", 48, 2, 0), ("forward", "all_gather", 40, 2, 0),
                   ("backward", "p2p send", 24, 2, 7), ("backward", "p2p recv", 24, 2, 7)], got
    assert counter.total("forward", ("all_reduce", "all_gather")) == (2, 88)
    assert counter.total("backward", ("p2p send",)) == (1, 24)


def check_per_layer_counts():
    """MP=2: exactly the Megatron minimum per layer; SP=2: forward at the minimum, backward within one hop."""
    for kind in ("mp", "sp"):
        ps = grid(2, 1) if kind == "mp" else grid(1, 2)
        rows = comm.layout_rows(kind, 2, {layers: comm.count_step(ps, layers) for layers in (1, 3)})
        assert [r["phase"] for r in rows] == ["forward", "backward"]
        for r in rows:
            for key in ("calls_per_layer", "bytes_per_layer", "min_calls_per_layer", "min_bytes_per_layer",
                        "outside_layers_calls", "outside_layers_bytes"):
                assert isinstance(r[key], (int, float)) and r[key] >= 0, (key, r)
        fwd, bwd = rows
        block = 2 * comm.BATCH * (comm.SEQ // 2) * comm.KV_HEADS * comm.HEAD_DIM * 4
        if kind == "mp":
            hidden = comm.BATCH * comm.SEQ * comm.HIDDEN * 4
            for r in rows:
                assert (r["calls_per_layer"], r["bytes_per_layer"]) == (2, 2 * hidden), r
                assert (r["min_calls_per_layer"], r["min_bytes_per_layer"]) == (2, 2 * hidden), r
        else:
            assert (fwd["calls_per_layer"], fwd["bytes_per_layer"]) == (1, block), fwd
            assert (fwd["min_calls_per_layer"], bwd["min_calls_per_layer"]) == (1, 2)
            assert bwd["min_bytes_per_layer"] == 2 * block
            assert 2 <= bwd["calls_per_layer"] <= 3 and bwd["bytes_per_layer"] == bwd["calls_per_layer"] * block, bwd


COMM_CHECKS = [check_counter_records_known_calls, check_per_layer_counts]


@pytest.fixture(scope="module")
def comm_report():
    return run_checks(2, COMM_CHECKS)


@pytest.mark.parametrize("name", [c.__name__ for c in COMM_CHECKS])
def test_comm(comm_report, name):
    assert_check(comm_report, name)


# --------------------------------------------------------------------------------------------------------
# FLOPs, GEMM timer, refusal, GRPO prompt files
# --------------------------------------------------------------------------------------------------------

def test_flop_formula_counts_every_matmul_weight():
    from llama_rlhf.models.pretrained import build_model
    from llama_rlhf.parallel.state import single_process_state
    cfg = comm.tiny_config(3)  # h 64, f 128, 4 heads / 2 KV of 16, vocab 128, untied head
    by_hand = 3 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 128 * 64
    assert mfu.matmul_params(cfg) == by_hand == 118784
    model = build_model(cfg, single_process_state())
    counted = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
    assert counted == by_hand
    assert mfu.train_flops_per_token(cfg, 64) == 6 * 118784 + 12 * 3 * 4 * 16 * 64
    train = [{"impl": "llama_rlhf", "mp": 1, "dtype": "float32", "batch": 2, "seq": 64, "step_s_median": 0.5,
              "step_s_min": 0.4, "step_s_max": 1.0},
             {"impl": "llama_rlhf", "mp": 2, "dtype": "float32", "status": "refused", "reason": "x"}]
    peaks = {"float32": {"peak_gflops": 10.0}}
    (row,) = mfu.mfu_rows(train, peaks, cfg)
    flops = 2 * 64 * (6 * 118784 + 12 * 3 * 4 * 16 * 64)
    assert row["model_gflop_per_step"] == pytest.approx(flops / 1e9)
    assert row["achieved_gflops"] == pytest.approx(flops / 0.5 / 1e9)
    assert row["achieved_gflops_range"] == pytest.approx([flops / 1.0 / 1e9, flops / 0.4 / 1e9])
    assert row["mfu"] == pytest.approx(flops / 0.5 / 1e9 / 10.0)


def test_gemm_worker_reports_positive_rates():
    rates = mfu.gemm_worker("float32", 1, [32, 64], 2, [[8, 16, 32], [8, 32, 16]])
    assert list(rates) == [32, 64, "model"] and all(len(r) == 2 and min(r) > 0 for r in rates.values())
    shapes = mfu.model_gemm_shapes(comm.tiny_config(3), 10)
    assert shapes == [[10, 64, 64], [10, 64, 32], [10, 64, 32], [10, 64, 64], [10, 64, 128], [10, 64, 128],
                      [10, 128, 64], [10, 64, 128]]
    # one layer's GEMMs plus the head: 2 x tokens x (that layer's matmul params + the head's)
    assert sum(m * k * n for m, k, n in shapes) == 10 * (36864 + 8192)


def test_mp_refusal_names_the_numbers(smollm2_dir):
    message = load.mp_refusal(smollm2_dir, 2)
    assert message and "9" in message and "--model_parallel_size 2" in message
    assert load.mp_refusal(smollm2_dir, 1) is None and load.mp_refusal(smollm2_dir, 3) is None


def test_grpo_prompt_files_follow_our_epoch_order(tmp_path):
    from llama_rlhf.data import epoch_order
    cfg = grpo_step.settings(quick=True)[0]
    ours, theirs = grpo_step.write_prompts(str(tmp_path), cfg)
    read = lambda path: [json.loads(x) for x in open(path, encoding="utf-8")]  # noqa: E731
    a, b = read(ours), read(theirs)
    n = cfg["prompts"] * (cfg["steps"] + 1)
    assert len(a) == len(b) == n
    assert b == [a[i] for i in epoch_order(n, grpo_step.SEED, 0)]


def test_dpo_pair_files_follow_our_epoch_order(tmp_path):
    from llama_rlhf.data import epoch_order
    cfg = dpo_step.settings(quick=True)[0]
    ours, theirs = dpo_step.write_pairs(str(tmp_path), cfg)
    read = lambda path: [json.loads(x) for x in open(path, encoding="utf-8")]  # noqa: E731
    a, b = read(ours), read(theirs)
    n = cfg["pairs"] * (cfg["steps"] + 1)
    assert len(a) == len(b) == n
    assert b == [a[i] for i in epoch_order(n, dpo_step.SEED, 0)]
    with open(dpo_step.DATA, encoding="utf-8") as f:
        first = [json.loads(line) for line in f][:3]  # one record of each shape, as TRL conversational records
    user = lambda r: [{"role": "user", "content": r}]  # noqa: E731
    reply = lambda r: [{"role": "assistant", "content": r}]  # noqa: E731
    assert a[0] == {"prompt": user(first[0]["instruction"]), "chosen": reply(first[0]["chosen"]),
                    "rejected": reply(first[0]["rejected"])}
    assert a[1] == first[1] and a[2]["prompt"] == first[2]["chosen"][:-1]
    assert a[2]["chosen"] == first[2]["chosen"][-1:] and a[2]["rejected"] == first[2]["rejected"][-1:]


# --------------------------------------------------------------------------------------------------------
# results writer
# --------------------------------------------------------------------------------------------------------

def fake_results() -> dict:
    t = {"step_s_median": 2.0, "step_s_min": 1.8, "step_s_max": 2.4}
    train = [{"impl": "transformers", "mp": 1, "dtype": "float32", "batch": 2, "seq": 256, **t, "tokens_per_s": 256,
              "peak_rss_mb_per_rank": 3000.0, "loss": 1.0},
             {"impl": "llama_rlhf", "mp": 1, "dtype": "float32", "batch": 2, "seq": 256, "step_s_median": 1.0,
              "step_s_min": 0.9, "step_s_max": 1.2, "tokens_per_s": 512, "peak_rss_mb_per_rank": 2900.0,
              "loss": 1.0, "speedup_vs_transformers": 2.0, "rss_ratio_vs_transformers": 0.97,
              "transformers_same_malloc": {"tokens_per_s": 400.0, "step_s_median": 1.28, "step_s_min": 1.2,
                                           "step_s_max": 1.4, "peak_rss_mb_per_rank": 3100.0},
              "speedup_vs_transformers_same_malloc": 1.25},
             {"impl": "llama_rlhf", "mp": 2, "dtype": "float32", "batch": 2, "seq": 256, "status": "refused",
              "reason": "num_attention_heads 9 is not divisible by --model_parallel_size 2"}]
    s = lambda m: {"median": m, "min": m * 0.9, "max": m * 1.1, "n": 3}  # noqa: E731
    peak = {"benchmark": "mfu", "kind": "matmul_peak", "dtype": "float32", "threads": 2, "peak_gflops": 200.0,
            "gflops": s(180.0), "best_size": 2048, "per_size_gflops": {2048: s(180.0)},
            "model_gemm_gflops": s(150.0), "model_gemm_shapes": [[512, 64, 64]]}
    mfu_rows = [peak] + [{"benchmark": "mfu", "kind": "train_step", "impl": impl, "mp": 1, "dtype": "float32",
                          "batch": 2, "seq": 256, "model_gflop_per_step": 400.0, "achieved_gflops": g,
                          "achieved_gflops_range": [g * 0.9, g * 1.1], "peak_gflops": 200.0, "mfu": g / 200.0,
                          "flops_formula": "f"} for impl, g in (("llama_rlhf", 150.0), ("transformers", 100.0))]
    generate = [{"benchmark": "generate", "dtype": "float32", "mp": 1, "batch": b, "new_tokens": 32,
                 "transformers_tokens_per_s": 10.0 * b, "llama_rlhf_tokens_per_s": 15.0 * b,
                 "speedup_vs_transformers": 1.5, "greedy_agreement": 1.0} for b in (1, 16)]
    ring = [{"config": c, "kernel": k, "sp": sp, "seq_len_tokens": 2048, "tokens_per_rank": 2048 // sp,
             "fwd_bwd_ms": 30.0 / sp, "peak_mb_per_rank": 20.0 / sp, "memory_method": "m"}
            for c, k, sp in (("sdpa (whole sequence, 1 process)", "sdpa", 1), ("ring cpu_flash SP=1", "cpu_flash", 1),
                             ("ring cpu_flash SP=2", "cpu_flash", 2))]
    sweep = [dict(r, seq_len_tokens=1024) for r in ring[1:]]
    load_rows = [{"benchmark": "load", "impl": "transformers", "mp": 1, "status": "ok", "load_s": s(2.0),
                  "peak_rss_mb_per_rank": s(900.0), "increase_mb_per_rank": s(660.0)},
                 {"benchmark": "load", "impl": "llama_rlhf", "mp": 1, "status": "ok", "load_s": s(0.5),
                  "peak_rss_mb_per_rank": s(760.0), "increase_mb_per_rank": s(530.0), "peak_ratio_vs_mp1": 1.0,
                  "increase_ratio_vs_mp1": 1.0, "peak_ratio_vs_transformers": 0.84,
                  "load_speedup_vs_transformers": 4.0},
                 {"benchmark": "load", "impl": "llama_rlhf", "mp": 2, "status": "refused", "reason": "9 heads"},
                 {"benchmark": "load", "impl": "llama_rlhf", "mp": 3, "status": "ok", "load_s": s(0.5),
                  "peak_rss_mb_per_rank": s(300.0), "increase_mb_per_rank": s(180.0), "peak_ratio_vs_mp1": 0.4,
                  "increase_ratio_vs_mp1": 0.34, "peak_ratio_vs_transformers": 0.33,
                  "load_speedup_vs_transformers": 4.0}]
    comm_rows = [{"layout": "MP=2", "kind": "mp", "size": 2, "phase": p, "calls_per_layer": 2,
                  "bytes_per_layer": 64.0, "min_calls_per_layer": 2, "min_bytes_per_layer": 64,
                  "outside_layers_calls": 1, "outside_layers_bytes": 32.0, "model": "tiny"}
                 for p in ("forward", "backward")]
    grpo = [{"prompts": 2, "group": 4, "new_tokens": 24, "beta": 0.0, "dtype": "float32",
             "llama_rlhf_step_s": s(5.0), "trl_step_s": s(8.0), "llama_rlhf_rollout_s": s(1.0),
             "trl_rollout_s": s(2.0), "llama_rlhf_completion_len": 22.0, "trl_completion_len": 23.0,
             "speedup_vs_trl": 1.6}]
    dpo = [{"pairs": 8, "steps": 4, "loss_type": "sigmoid", "beta": 0.1, "dtype": "float32",
            "llama_rlhf_step_s": s(4.0), "trl_step_s": s(6.0), "speedup_vs_trl": 1.5,
            "llama_rlhf_peak_memory_mb": 2400.0, "trl_peak_memory_mb": 3000.0, "memory_vs_trl": 0.8,
            "tokens_per_step": 1300.0, "same_input_ids": True, "llama_rlhf_trained_tokens": 220,
            "trl_trained_tokens": 228, "llama_rlhf_first_loss": 0.6931, "trl_first_loss": 0.6931}]
    size = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 704, "params_m": 17.6}
    model_size = [dict(train[0], **size),
                  dict(train[1], **size, speedup_vs_transformers=1.9, rss_ratio_vs_transformers=0.9)]
    memory = [{"benchmark": "memory", "world": 2, "dp": 2, "zero_stage": st, "dtype": "bfloat16", "batch_per_rank": 1,
               "seq": 256, "step_s_median": t, "step_s_min": t, "step_s_max": t, "tokens_per_s": 512 / t,
               "peak_rss_mb_per_rank": mb, "bytes_per_param": bpp, "bytes_per_param_theory": bpp}
              for st, t, mb, bpp in ((0, 1.0, 3000.0, 16.0), (1, 1.02, 2000.0, 12.0))]
    memory[1].update(step_time_vs_stage0=1.02, peak_rss_vs_stage0=2 / 3)
    memory.append(dict(memory[1], kind="mfu", world=1, dp=1, mfu=0.62, achieved_gflops=275.0, peak_gflops=443.0))
    lora = [{"benchmark": "lora", "impl": impl, "mode": mode, "batch": 2, "seq": 256, "step_s_median": t,
             "step_s_min": t, "step_s_max": t, "tokens_per_s": 512 / t, "peak_rss_mb_per_rank": mb,
             "trainable_parameters": 4_884_480}
            for impl, mode, t, mb in (("llama_rlhf", "lora", 1.0, 900.0), ("peft", "lora", 2.0, 1200.0))]
    lora[0].update(speedup_vs_peft=2.0, peak_rss_vs_peft=0.75)
    entry = lambda rows: {"rows": rows, "seconds": 1.0, "load_before": [0.5, 0.5, 0.5],  # noqa: E731
                          "load_after": [0.6, 0.5, 0.5]}
    data = [{"benchmark": "data", "samples": 1_000_000, "world": 2, "cached_s_per_rank": 3.0, "file_mb": 540.0,
             "method": "m", "old_slice_s": 120.0, "old_slice_rss_mb": 180.0, "slice": 20000, "cold_slice_s": 30.0,
             "cached_file_rss_mb_per_rank": 60.0, "cached_slice_s": 1.0,
             "old_s_per_rank_extrapolated": 6000.0, "speedup_vs_old": 2000.0, "cached_rss_mb_per_rank": 40.0,
             "old_rss_mb_per_rank_extrapolated": 9000.0, "cold_s_extrapolated": 1500.0}]
    return {"data": entry(data), "train_step": entry(train), "mfu": entry(mfu_rows), "model_size": entry(model_size),
            "memory": entry(memory), "generate": entry(generate),
            "ring_attention": entry(ring), "ring_attention_sweep": entry(sweep), "load": entry(load_rows),
            "comm": entry(comm_rows), "grpo_step": entry(grpo), "dpo_step": entry(dpo), "lora": entry(lora),
            "broken": {"rows": [], "seconds": 0.1, "load_before": [0, 0, 0], "load_after": [0, 0, 0],
                       "error": "RuntimeError: boom"}}


def test_generation_targets_use_the_whole_machine_and_show_one_thread():
    results = fake_results()
    one = results["generate"]["rows"]
    whole = [dict(r, threads=2, speedup_vs_transformers=2.1) for r in one]
    bf16 = [dict(r, dtype="bfloat16", threads=4, speedup_vs_transformers=9.0) for r in one]  # not fp32: ignored
    results["generate"]["rows"] = one + whole + bf16
    targets = {t["target"]: t for t in run.evaluate_targets(results)}
    assert targets["generation"]["status"] == "met" and targets["generation"]["figures"] == {"batch 16 speedup": 2.1}
    assert targets["generation"]["also"] == {"one thread": 1.5} and "2 threads" in targets["generation"]["goal"]
    assert targets["generation batch 1"]["also"] == {"one thread": 1.5}


def test_targets_from_results():
    targets = {t["target"]: t for t in run.evaluate_targets(fake_results())}
    assert targets["training throughput"]["status"] == "met"  # 2.0x >= 1.3x
    assert targets["MFU"]["status"] == "met" and targets["MFU"]["figures"] == {"float32 MFU": 0.75}
    assert targets["generation"]["status"] == "missed"  # 1.5x < 2x
    assert targets["generation batch 1"]["status"] == "met"  # 1.5x >= 1.5x
    assert targets["load memory"]["status"] == "met" and targets["load memory"]["also"]
    assert targets["GRPO step"]["status"] == "missed"  # 1.6x < 2.5x
    assert targets["stage-1 bytes per parameter"]["status"] == "met"  # 12 <= 6 + 12/2
    assert targets["stage-1 step time"]["figures"] == {"DP=2 bfloat16 stage 1 / stage 0": 1.02}
    assert targets["data cached start"]["status"] == "met" and targets["data memory"]["status"] == "met"
    assert run.evaluate_targets({})[0]["status"] == "not measured"


def test_results_writer(tmp_path):
    results = fake_results()
    facts = run.machine_facts()
    assert re.fullmatch(r"[a-z0-9-]+", run.machine_name(facts))
    for key in ("cpu_model", "cpu_count", "usable_cores", "torch", "device"):
        assert facts[key], key
    meta = {"quick": True, "started": "now", "seconds": 3.0, "load_before": [1, 1, 1], "load_after": [1, 1, 1]}
    paths = run.write_results(results, facts, meta, str(tmp_path), "machine-x")
    assert set(paths) == {"json", "md", "png"}
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.load(open(paths["json"], encoding="utf-8"))
    assert data["machine"]["torch"] == torch.__version__ and data["quick"] is True
    assert len(data["targets"]) == 10 and set(data["benchmarks"]) == set(results)
    table = data["table"]
    by = lambda bench, metric: [r for r in table if r["benchmark"] == bench and r["metric"] == metric]  # noqa: E731
    train_tps, same_malloc = [r for r in by("train_step", "tokens/s") if r["ours"] != "refused"]
    assert train_tps["ours"] == {"median": 512.0, "min": 512 / 1.2, "max": 512 / 0.9}
    assert train_tps["competitor"]["median"] == 256.0 and train_tps["ratio"] == 2.0
    assert same_malloc["competitor"]["median"] == 512 / 1.28 and same_malloc["ratio"] == 1.25
    assert "malloc" in same_malloc["competitor_name"]
    (size_tps,) = by("model_size", "tokens/s")
    assert size_tps["ratio"] == 1.9 and "18M params (256 x 4 layers)" in size_tps["configuration"]
    assert any(r["ours"] == "refused" and "9" in r["configuration"] for r in by("train_step", "tokens/s"))
    (grpo,) = by("grpo_step", "step s")
    assert grpo["ratio"] == 1.6 and grpo["ratio_kind"] == "faster"
    (dpo_time,) = by("dpo_step", "step s")
    assert dpo_time["ratio"] == 1.5 and dpo_time["competitor"]["median"] == 6.0
    assert "DPOTrainer" in dpo_time["competitor_name"]
    (dpo_mem,) = by("dpo_step", "peak RSS MB/rank")
    assert dpo_mem["ours"] == 2400.0 and dpo_mem["ratio"] == 0.8 and dpo_mem["ratio_kind"] == "memory"
    assert "220 / 228" in dpo_step.format_table(results["dpo_step"]["rows"])
    assert by("comm", "all-reduce calls")[0]["ratio"] == 1.0
    (lora_tps,) = by("lora", "tokens/s")
    assert lora_tps["ratio"] == 2.0 and lora_tps["competitor"]["median"] == 256.0 and "PEFT" in lora_tps["competitor_name"]
    md = open(paths["md"], encoding="utf-8").read()
    for needle in ("| benchmark | configuration | metric | llama_rlhf | competitor | vs competitor |",
                   "## Targets", "**GRPO step**", "zero stage 1 | MFU % | 62.0", "**missed**", "error: RuntimeError: boom",
                   "machine-x.png", "2.00x faster", "512 [427-569]", "0.75x peak"):
        assert needle in md, needle
    text = run.table_text(run.summary_table(results))
    assert text.splitlines()[0].startswith("benchmark") and "1.60x faster" in text
    assert os.path.getsize(paths["png"]) > 10_000
