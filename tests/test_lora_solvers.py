"""LoRA through the solvers: SFT loss falls at DP=2 and resumes exactly, PEFT loads the checkpoint and gives our
logits, merged/ equals it, QLoRA nf4 learns at MP=2, GRPO with LoRA and beta > 0 raises the reward (reference =
adapters off), solver_generate --lora_dir equals sampling the merged model, bad LoRA flags stop every rank."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, launch_ranks, torchrun
from tests.test_grpo import grpo_args
from tests.test_train import train_args

LORA = ["--lora_rank", "16", "--lora_alpha", "32", "--lr", "1e-2", "--epochs", "3"]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, smollm2_dir):
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")) as f:
        path.write_text("".join(f.readlines()[:64]))
    return str(path)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def falls(values, margin):
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    return last < first - margin, f"first {values[:3]}, last {values[-3:]}"


def test_sft_lora_learns_resumes_exactly_and_peft_loads_it(tiny_chat, sft_data, tmp_path):
    out = str(tmp_path / "run")
    proc = torchrun("solver_train.py", train_args(tiny_chat, sft_data, out, *LORA, "--max_steps", "12",
                                                  "--save_steps", "6", "--merge_lora", "true"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = metrics(out)
    ok, why = falls([m["loss"] for m in seen], 0.25)
    assert ok, f"LoRA SFT loss did not fall: {why}"
    print(f"LoRA SFT DP=2 losses {[round(m['loss'], 3) for m in seen]}, peak {seen[-1]['peak_memory_mb']} MB/rank")
    ckpt = os.path.join(out, "checkpoint-12")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "merged"} <= set(os.listdir(ckpt))
    assert "config.json" not in os.listdir(ckpt) and "model.safetensors" not in os.listdir(ckpt)

    # resume from checkpoint-6: the same losses and the same adapter, bit for bit
    split = str(tmp_path / "split")
    shutil.copytree(out, split, ignore=shutil.ignore_patterns("checkpoint-12"))
    with open(os.path.join(split, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(m) + "\n" for m in seen[:6]))
    proc = torchrun("solver_train.py", train_args(tiny_chat, sft_data, split, *LORA, "--max_steps", "12",
                                                  "--save_steps", "6", "--resume", "true"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert [m["loss"] for m in metrics(split)] == [m["loss"] for m in seen]
    a = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    b = load_file(os.path.join(split, "checkpoint-12", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "adapter differs after resume"
    assert all(k.startswith("base_model.model.model.layers.") for k in a)

    # PEFT loads the checkpoint on transformers' base; our model with that adapter gives the same logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llama_rlhf.checkpoint.peft import load_adapter
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.parallel.state import single_process_state
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.float32, attn_implementation="eager")
        theirs = PeftModel.from_pretrained(base, ckpt)(input_ids=ids).logits
        ours_model = load_pretrained(tiny_chat, "llama-hf", single_process_state())
        load_adapter(ours_model, ckpt)
        ours = ours_model(ids)[..., :49152]
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "merged"), dtype=torch.float32,
                                                      attn_implementation="eager")(input_ids=ids).logits
    d, dm = (ours - theirs).abs().max().item(), (merged - theirs).abs().max().item()
    print(f"trained adapter: ours vs PEFT {d:.2e}, merged/ vs PEFT {dm:.2e}")
    assert d <= 1e-5 and dm <= 1e-5, (d, dm)


def test_qlora_nf4_learns_at_mp2_with_checkpointing_and_packing(tiny_chat, sft_data, tmp_path):
    out = str(tmp_path / "qlora")
    proc = torchrun("solver_train.py", train_args(tiny_chat, sft_data, out, *LORA, "--max_steps", "16",
                                                  "--quantize_base", "nf4", "--model_parallel_size", "2",
                                                  "--activation_checkpointing", "true", "--packing", "true"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0.5625 bytes/parameter" in proc.stdout
    seen = metrics(out)
    ok, why = falls([m["loss"] for m in seen], 0.15)  # the tiny model's random, frozen LM head learns slowly
    assert ok, f"QLoRA SFT loss did not fall: {why}"
    print(f"QLoRA nf4 MP=2 losses {[round(m['loss'], 3) for m in seen]}, peak {seen[-1]['peak_memory_mb']} MB/rank")


def test_grpo_lora_reward_rises_with_the_adapters_off_reference(tiny_chat, tmp_path):
    data = tmp_path / "prompts.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "grpo_arithmetic.jsonl")) as f:
        data.write_text("".join(f.readlines()[:24]))
    reward_file = tmp_path / "even.py"
    reward_file.write_text("def even_ids(completion, sample):\n"
                           "    ids = sample['completion_ids']\n"
                           "    return sum(t % 2 == 0 for t in ids) / max(len(ids), 1)\n")
    out = str(tmp_path / "grpo")
    proc = torchrun("solver_grpo.py", grpo_args(tiny_chat, str(data), out, f"{reward_file}:even_ids",
                                                "--max_steps", "16", "--epochs", "3", "--beta", "0.01",
                                                "--lora_rank", "16", "--lora_alpha", "32", "--lr", "3e-2"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = metrics(out)
    rewards = [m["reward_mean"] for m in seen]
    print(f"GRPO LoRA rewards {[round(r, 3) for r in rewards]}, kl {[round(m['kl'], 4) for m in seen]}")
    assert sum(rewards[-3:]) / 3 >= sum(rewards[:3]) / 3 + 0.2, f"mean reward did not rise: {rewards}"
    assert seen[0]["kl"] == 0.0 and max(m["kl"] for m in seen) > 0, "the KL to the adapters-off model never moved"


def test_generate_lora_dir_equals_the_merged_model(tiny_chat, sft_data, tmp_path):
    out = str(tmp_path / "run")
    proc = torchrun("solver_train.py", train_args(tiny_chat, sft_data, out, *LORA, "--max_steps", "6",
                                                  "--merge_lora", "true", "--lr", "3e-2"), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = os.path.join(out, "checkpoint-6")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"What is {i} + {i}?"}) + "\n" for i in range(4)))
    results = {}
    for name, extra in (("adapter", ["--ckpt_dir", tiny_chat, "--lora_dir", ckpt]),
                        ("merged", ["--ckpt_dir", os.path.join(ckpt, "merged")]),
                        ("base", ["--ckpt_dir", tiny_chat])):
        logs = str(tmp_path / name)
        proc = torchrun("solver_generate.py", [*extra, "--label_file", str(prompts), "--log_dir", logs,
                                               "--max_new_tokens", "12", "--dtype", "float32", "--max_seq_len", "128",
                                               "--model_parallel_size", "2", "--use_chat_template"], nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(os.path.join(logs, "results.jsonl")) as f:
            results[name] = [json.loads(line)["output"] for line in f]
    assert results["adapter"] == results["merged"] and len(results["adapter"]) == 4
    assert results["adapter"] != results["base"], "the adapter did not change the samples: the test cannot tell"


@pytest.mark.parametrize("flags, fragment", [
    (["--lora_alpha", "8"], "--lora_alpha needs --lora_rank >= 1 (or --lora_dir)"),
    (["--lora_rank", "4", "--lora_target_modules", "q_proj,qkv"], "unknown module 'qkv'"),
    (["--lora_dir", "/nonexistent/adapter"], "--lora_dir /nonexistent/adapter: no adapter_config.json"),
])
def test_bad_lora_flags_stop_every_rank(tiny_chat, sft_data, tmp_path, flags, fragment):
    results = launch_ranks("solver_train.py", train_args(tiny_chat, sft_data, str(tmp_path / "o"), *flags), world=2)
    for rank, r in enumerate(results):
        assert r.returncode != 0 and fragment in r.stderr and f"[rank {rank}] error:" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
