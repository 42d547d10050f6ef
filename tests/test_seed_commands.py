"""The commands Llama-RLHF users already have (its README; issue 19) run here unchanged.

The three commands below are Llama-RLHF's README text for text. Substituted, and nothing else: the paths (to tmp
folders), ``--nproc_per_node`` (8 GPUs -> 2 or 4 CPU processes), tiny random models of the named families (a Qwen2
for ``--model_type qwen``, a Llama 3.1-style Llama for ``llama3-hf``, both with SmolLM2's chat tokenizer) and small
data. So the layouts are: training MP=2 SP=1 on 2 processes (DP=1 instead of 4); sampling MP=4 on 4 processes (DP=1
instead of 2); the multi-node script on 2 "nodes" of 1 process each (``localhost slots=2``, MP=2 across them).
Two more substitutions keep the tests honest on a shared machine: ``torchrun`` is this interpreter's
``python -m torch.distributed.run`` (a shim first on PATH), and the ports are free ones (``PET_MASTER_PORT`` for
the single-node commands, whose text names none; the multi-node script's fixed 29980 is replaced).

Both commands pass the checkpoint folder (with a trailing slash) as --config_file and --tokenizer_file, the case
issue 19 found broken; the other spellings (file, folder, missing path, folder without the config) are checked
below for an HF and a Meta original checkpoint, mostly in-process.
"""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_rlhf.cli import LLAMA_RLHF_FLAGS
from llama_rlhf.models.config import ConfigError
from llama_rlhf.models.families import config_folder, detect_model_type, get_family
from llama_rlhf.models.pretrained import load_pretrained
from llama_rlhf.parallel.state import single_process_state
from llama_rlhf.runtime import UsageError
from llama_rlhf.tokenizer import tokenizer_source
from llama_rlhf.training.checkpointing import export_config_source
from tests.distributed import free_port
from tests.family_reference import build_hf_model
from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, launch_ranks
from tests.test_meta_checkpoints import llama3_params, write_meta_checkpoint, write_tiktoken
from tests.test_multinode import mpi_env
from tests.test_train import expect_failure_on_every_rank

TRAIN_COMMAND = """
export CKPT_DIR="./qwen-2.5-3b-instruct/"
export SAVE_DIR="path/to/save/"
export TRAIN_FILE="./train.jsonl"
export MP=2
export SP=1
torchrun --nproc_per_node 8 solver_train.py --model_parallel_size ${MP} --sequence_parallel_size ${SP} \\
  --ckpt_dir ${CKPT_DIR} --save_dir ${SAVE_DIR} --train_file ${TRAIN_FILE} --model_type qwen \\
  --config_file ${CKPT_DIR} --tokenizer_file ${CKPT_DIR} --max_seq_len 4096 --max_batch_size 4 --lr 1e-5 \\
  --epochs 1 --use_chat_template
"""

GENERATE_COMMAND = """
export CKPT_DIR="./llama-3.1-8b-instruct/"
export LOG_DIR="path/to/log/"
export TEST_FILE="./test.jsonl"
export MP=4
export NUM_SAMPLES=1
torchrun --nproc_per_node 8 solver_generate.py --model_parallel_size ${MP} --ckpt_dir ${CKPT_DIR} \\
  --label_file ${TEST_FILE} --log_dir ${LOG_DIR} --model_type llama3-hf --max_seq_len 1024 --max_batch_size 128 \\
  --temperature 0.6 --top_p 0.95 --tokenizer_file ${CKPT_DIR} --config_file ${CKPT_DIR} \\
  --num_samples_per_prompt ${NUM_SAMPLES} --use_chat_template
"""

MULTI_NODE_SCRIPT = """readonly NODE_RANK="${OMPI_COMM_WORLD_RANK:-0}"
readonly NNODES="${OMPI_COMM_WORLD_SIZE:-1}"
readonly MASTER_PORT=29980
readonly MASTER_ADDR="${_MASTER_ADDR:-localhost}"

export CKPT_DIR="./qwen-2.5-3b-instruct/"
export SAVE_DIR="path/to/save/"
export TRAIN_FILE="./train.jsonl"
export MP=2
export SP=1

torchrun \\
--nnodes ${NNODES} \\
--nproc_per_node 8 \\
--node_rank ${NODE_RANK} \\
--master_addr ${MASTER_ADDR} \\
--master_port ${MASTER_PORT} \\
solver_train.py \\
--model_parallel_size ${MP} \\
--sequence_parallel_size ${SP} \\
--ckpt_dir ${CKPT_DIR} \\
--save_dir ${SAVE_DIR} \\
--train_file ${TRAIN_FILE} \\
--model_type qwen \\
--config_file ${CKPT_DIR} \\
--tokenizer_file ${CKPT_DIR} \\
--max_seq_len 4096 \\
--max_batch_size 4 \\
--lr 1e-5 \\
--epochs 1 \\
--use_chat_template
"""

VOCAB = 49152  # SmolLM2's tokenizer
SFT_DATA = os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")
PROMPTS = os.path.join(ROOT, "examples", "data", "prompts.jsonl")


def substitute(text: str, **replacements) -> str:
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def stops_early(folder: str, end_id: int = 2) -> None:
    """Make a random tiny model emit its end token with probability ~0.1 per step at temperature 0.6 (so sampling
    without --max_new_tokens ends after a few tokens): a constant embedding dimension read only by the end token."""
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    weights["model.embed_tokens.weight"][:, 0] = 4.0
    weights["lm_head.weight"][:, 0] = 0.0
    weights["lm_head.weight"][end_id, 0] = 0.65
    save_file(weights, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def work(tmp_path_factory, smollm2_dir):
    """The users' folder: both checkpoints, their data, and a `torchrun` on PATH that is this interpreter's."""
    root = tmp_path_factory.mktemp("seed")
    write_tiny_chat_model(str(root / "qwen-2.5-3b-instruct"), smollm2_dir, seed=1, architecture="qwen2",
                          max_position_embeddings=4096)
    llama = write_tiny_chat_model(
        str(root / "llama-3.1-8b-instruct"), smollm2_dir, seed=2, max_position_embeddings=1024,
        num_key_value_heads=1, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256})
    stops_early(llama)
    with open(SFT_DATA) as f:
        (root / "train.jsonl").write_text("".join(f.readlines()[:8]))
    with open(PROMPTS) as f:
        (root / "test.jsonl").write_text(f.read())
    (root / "bin").mkdir()
    shim = root / "bin" / "torchrun"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
    shim.chmod(0o755)
    return root


def env_for(work, **extra) -> dict:
    env = mpi_env(**extra)
    env["PATH"] = f"{work / 'bin'}{os.pathsep}{env['PATH']}"
    return env


def bash(script: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses(folder) -> list[float]:
    return [r["loss"] for r in read_jsonl(os.path.join(folder, "metrics.jsonl"))]


def response_loss(model, tokenizer, rows) -> float:
    """transformers' token-mean loss over the responses of `rows`, prompts rendered with the chat template."""
    total, count = 0.0, 0
    for row in rows:
        prompt = [{"role": "user", "content": row["instruction"]}]
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": row["output"]}],
                                            return_dict=True)["input_ids"]
        labels = torch.tensor([ids])
        labels[0, :len(prompt_ids)] = -100
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
        n = int((labels[0, 1:] != -100).sum())
        total, count = total + loss * n, count + n
    return total / count


@pytest.fixture(scope="module")
def trained(work):
    """The training command as users have it: the save folder and the process."""
    save = work / "save"
    command = substitute(TRAIN_COMMAND, **{"--nproc_per_node 8": "--nproc_per_node 2",
                                          "./qwen-2.5-3b-instruct/": f"{work}/qwen-2.5-3b-instruct/",
                                          "path/to/save/": f"{save}/", "./train.jsonl": f"{work}/train.jsonl"})
    proc = bash(command, env_for(work, PET_MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save, proc


def test_training_command(work, trained):
    """Loss finite and sane (about ln V for a random model), the HF export loads in transformers with every key,
    and its loss on the training data is below the initial model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    save, proc = trained
    assert "training qwen | layout MP=2 SP=1 DP=1" in proc.stdout, proc.stdout
    run_losses = losses(save)
    assert len(run_losses) == 2  # 8 rows / (4 per rank x DP 1)
    assert all(math.isfinite(x) and abs(x - math.log(VOCAB)) < 0.5 for x in run_losses), run_losses
    rows = read_jsonl(work / "train.jsonl")
    export = save / "checkpoint-2"
    model, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.model_type == "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(export)
    initial = AutoModelForCausalLM.from_pretrained(work / "qwen-2.5-3b-instruct", dtype=torch.float32)
    before, after = response_loss(initial, tokenizer, rows), response_loss(model, tokenizer, rows)
    assert math.isfinite(after) and after < before, (before, after)
    print(f"losses {run_losses}; transformers response loss initial {before:.5f} -> exported {after:.5f}")


def test_generation_command_replaces_results(work):
    """One results line per input line, in input order; a stale results.jsonl in --log_dir is replaced."""
    log = work / "log"
    log.mkdir()
    (log / "results.jsonl").write_text('{"stale": true}\n' * 7)
    command = substitute(GENERATE_COMMAND, **{"--nproc_per_node 8": "--nproc_per_node 4",
                                             "./llama-3.1-8b-instruct/": f"{work}/llama-3.1-8b-instruct/",
                                             "path/to/log/": f"{log}/", "./test.jsonl": f"{work}/test.jsonl"})
    proc = bash(command, env_for(work, PET_MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generating with llama3-hf | MP=4 x 1 replicas" in proc.stdout, proc.stdout
    inputs, results = read_jsonl(work / "test.jsonl"), read_jsonl(log / "results.jsonl")
    assert len(results) == len(inputs) == 4
    for given, got in zip(inputs, results):
        assert got["instruction"] == given["instruction"] and "stale" not in got
        assert len(got["output"]) == 1 and got["finish_reason"][0] in ("stop", "length")
    assert sum(r["num_output_tokens"][0] for r in results) > 4, results  # not all stopped at once


def test_multi_node_script_through_mpirun_sh(work, trained):
    """Llama-RLHF's train-multi-node.sh, started by `bash mpirun.sh hostfile train-multi-node.sh` on 2 "nodes":
    the losses of the single-node run (same MP=2 layout), value for value."""
    save = work / "multi"
    script = work / "train-multi-node.sh"
    script.write_text(substitute(MULTI_NODE_SCRIPT, **{
        "--nproc_per_node 8": "--nproc_per_node 1", "MASTER_PORT=29980": f"MASTER_PORT={free_port()}",
        "./qwen-2.5-3b-instruct/": f"{work}/qwen-2.5-3b-instruct/", "path/to/save/": f"{save}/",
        "./train.jsonl": f"{work}/train.jsonl"}))
    hostfile = work / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    proc = bash(f"bash mpirun.sh {hostfile} {script}", env_for(work))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout MP=2 SP=1 DP=1" in proc.stdout, proc.stdout
    assert losses(save) == pytest.approx(losses(trained[0]), rel=1e-6, abs=0)


def test_mpirun_sh_exports_master_addr_as_llama_rlhf_reads_it(work):
    """Llama-RLHF's scripts read the master's address from _MASTER_ADDR: mpirun.sh sets it to MASTER_ADDR."""
    probe = work / "probe.sh"
    probe.write_text('echo "master=$_MASTER_ADDR"\n')
    hostfile = work / "one_host"
    hostfile.write_text("localhost slots=1\n")
    proc = bash(f"bash mpirun.sh {hostfile} {probe}", env_for(work))
    assert proc.returncode == 0 and "master=localhost" in proc.stdout, proc.stdout + proc.stderr
    proc = bash(f"bash mpirun.sh {hostfile} {probe}", env_for(work, MASTER_ADDR="10.1.2.3"))
    assert proc.returncode == 0 and "master=10.1.2.3" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------ --config_file / --tokenizer_file spellings, in-process


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    """A tiny Meta original Llama 3 checkpoint (params.json, consolidated.00.pth, tiktoken tokenizer.model)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("meta")
    folder = str(root / "llama3_meta")
    os.makedirs(folder)
    vocab = write_tiktoken(folder)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      max_position_embeddings=131072, rope_parameters={
                          "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    write_meta_checkpoint(folder, build_hf_model(str(root / "hf"), cfg, LlamaForCausalLM, seed=5), llama3_params(),
                          n_shards=1, embedding_dim=0)
    return folder


def spellings(folder: str, file_name: str) -> dict:
    return {"folder": folder, "folder/": folder + "/", "file": os.path.join(folder, file_name)}


@pytest.mark.parametrize("kind", ["hf", "meta"])
def test_config_file_as_folder_file_or_trailing_slash(kind, work, meta):
    """Each spelling reads the same config as --ckpt_dir alone, and loads the same weights."""
    ckpt, model_type, name = ((str(work / "qwen-2.5-3b-instruct"), "qwen", "config.json") if kind == "hf" else
                              (meta, "llama3", "params.json"))
    family = get_family(model_type)
    want = family.read_config(ckpt)
    for spelling, path in spellings(ckpt, name).items():
        assert os.path.samefile(family.config_path(ckpt, path), os.path.join(ckpt, name)), spelling
        assert family.read_config(ckpt, path) == want, spelling
        if kind == "hf":  # --from_scratch: no --ckpt_dir (a Meta original needs its folder for its shards)
            assert family.read_config("", path) == want, spelling
        assert detect_model_type(config_folder(None, path)) == model_type, spelling
    ps = single_process_state()
    reference = load_pretrained(ckpt, model_type, ps).state_dict()
    loaded = load_pretrained(ckpt, model_type, ps, config_file=ckpt + "/").state_dict()
    assert reference.keys() == loaded.keys() and all(torch.equal(reference[k], loaded[k]) for k in reference)


@pytest.mark.parametrize("kind", ["hf", "meta"])
def test_config_file_missing_or_folder_without_config(kind, work, meta, tmp_path):
    ckpt, model_type, name, other = ((str(work / "qwen-2.5-3b-instruct"), "qwen", "config.json", meta)
                                     if kind == "hf" else (meta, "llama3", "params.json",
                                                           str(work / "qwen-2.5-3b-instruct")))
    family = get_family(model_type)
    missing = str(tmp_path / "no" / "such" / "path")
    for path in (missing, missing + "/", missing + f"/{name}"):
        with pytest.raises(ConfigError, match=f"^--config_file {path} does not exist$"):
            family.read_config(ckpt, path)
    with pytest.raises(ConfigError, match=f"^--config_file {missing} does not exist$"):
        config_folder(None, missing)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(ConfigError, match=f"^--model_type {model_type} reads {name}, but --config_file {empty} is a "
                                          f"folder without {name}$"):
        family.read_config(ckpt, empty)
    # the other kind of checkpoint: the message says what the folder holds
    with pytest.raises(ConfigError, match=f"--config_file {other} is a folder without {name}; it holds .* it looks "
                                          f"like --model_type {'llama3' if kind == 'hf' else 'qwen'}"):
        family.read_config(ckpt, other)
    with pytest.raises(ConfigError, match=f"--ckpt_dir {empty} is a folder without {name}$"):
        family.read_config(empty)


def test_export_config_source(work, meta):
    hf = str(work / "qwen-2.5-3b-instruct")
    for spelling, path in {**spellings(hf, "config.json"), "none": None}.items():
        args = argparse.Namespace(ckpt_dir=hf + "/", config_file=path, from_scratch=False)
        assert os.path.samefile(export_config_source(args, None), os.path.join(hf, "config.json")), spelling
    # a Meta original has no config.json: the export writes one from the model's config
    assert export_config_source(argparse.Namespace(ckpt_dir=meta, config_file=meta + "/"), None) is None


def test_tokenizer_file_spellings(work, meta, tmp_path):
    hf = str(work / "qwen-2.5-3b-instruct")
    for path in (hf, hf + "/", os.path.join(hf, "tokenizer.json"), meta, os.path.join(meta, "tokenizer.model")):
        assert tokenizer_source(path, "unused") == path
    assert tokenizer_source(None, hf + "/") == hf + "/" and tokenizer_source(None, None) is None
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"^--tokenizer_file {missing} does not exist$"):
        tokenizer_source(missing, hf)
    with pytest.raises(FileNotFoundError, match=f"^--tokenizer_file {tmp_path} is a folder without a tokenizer"):
        tokenizer_source(str(tmp_path), hf)


# ------------------------------------------------ Llama-RLHF's other flags


def parser_of(solver: str):
    import importlib
    return importlib.import_module(f"solver_{solver}").parse_args


BASE = {"train": ["--train_file", "t.jsonl", "--save_dir", "out"],
        "generate": ["--ckpt_dir", "c", "--label_file", "t.jsonl", "--log_dir", "logs"],
        "grpo": ["--ckpt_dir", "c", "--train_file", "t.jsonl", "--save_dir", "out"]}


def test_llama_rlhf_flags_refused_or_noted(capsys):
    for flag in LLAMA_RLHF_FLAGS:
        for solver in ("train", "generate", "grpo"):
            parse = parser_of(solver)
            if solver not in flag.solvers:
                with pytest.raises(SystemExit):  # not a flag of that solver there either: argparse's own error
                    parse(BASE[solver] + [flag.name, "2"])
                continue
            if flag.refused:
                with pytest.raises(UsageError, match=f"^{flag.name} 2 is a Llama-RLHF flag: "):
                    parse(BASE[solver] + [flag.name, "2"])
            else:
                args = parse(BASE[solver] + [flag.name])  # bare, as fire takes a boolean
                assert not hasattr(args, flag.name[2:])
                assert f"note: {flag.name} true (a Llama-RLHF flag) is ignored; not needed" in capsys.readouterr().out
            if flag.default is not None:  # Llama-RLHF's default asks for what happens here anyway
                parse(BASE[solver] + [flag.name, flag.default])
    with pytest.raises(UsageError, match="--begin_epoch 2 is a Llama-RLHF flag: pass --resume true"):
        parser_of("train")(BASE["train"] + ["--begin_epoch", "2"])
    with pytest.raises(UsageError, match="--kl_coef 0.04 is a Llama-RLHF flag: use --beta"):
        parser_of("grpo")(BASE["grpo"] + ["--kl_coef", "0.04"])
    # the flags of the commands above mean the same here
    args = parser_of("train")(BASE["train"] + ["--use_chat_template", "--seed", "3", "--dtype", "float32",
                                               "--save_steps", "5"])
    assert (args.use_chat_template, args.seed, args.dtype, args.save_steps) == (True, 3, "float32", 5)


# ------------------------------------------------ every rank stops, one line, no traceback


def test_bad_paths_stop_every_rank(work, tmp_path):
    """A missing --config_file (solver_train) and a folder without the family's config (solver_grpo): one line on
    each of the 2 ranks, no traceback, non-zero. (solver_generate reads its paths through the same functions.)"""
    from concurrent.futures import ThreadPoolExecutor
    hf, missing = str(work / "qwen-2.5-3b-instruct"), str(tmp_path / "missing")
    common = ["--ckpt_dir", hf, "--model_parallel_size", "2", "--max_seq_len", "64", "--dtype", "float32"]
    cases = [
        ("solver_train.py", ["--train_file", str(work / "train.jsonl"), "--save_dir", str(tmp_path / "a"),
                             "--model_type", "qwen", "--config_file", missing],
         f"--config_file {missing} does not exist"),
        ("solver_grpo.py", ["--train_file", str(work / "test.jsonl"), "--save_dir", str(tmp_path / "b"),
                            "--model_type", "llama3", "--config_file", hf + "/", "--max_new_tokens", "8"],
         f"--model_type llama3 reads params.json, but --config_file {hf}/ is a folder without params.json; it holds "
         f"an HF checkpoint (config.json): it looks like --model_type qwen"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:  # both worlds at once: start-up is most of their cost
        runs = list(pool.map(lambda case: launch_ranks(case[0], common + case[1], world=2, timeout=120), cases))
    for (_, _, message), results in zip(cases, runs):
        expect_failure_on_every_rank(results, message)
        for r in results:
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
