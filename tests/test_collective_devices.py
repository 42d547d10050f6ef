"""Every tensor handed to torch.distributed during SFT (MP=2, SP=2), GRPO (DP=2, SP=2) and generation (MP=2,
DP=2) was made on ``ps.device`` (see tests/collective_audit.py: host-made tensors are caught on the CPU too),
and object collectives run over gloo."""
import os

import pytest
import torch

from tests.collective_audit import CollectiveAudit
from tests.distributed import assert_check, run_checks
from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT

DATA = os.path.join(ROOT, "examples", "data")


def audited(fn, ps):
    with CollectiveAudit(ps.device) as audit:
        fn()
    problems = audit.problems()
    assert audit.calls, "no collective was recorded"
    assert not problems, "tensors not made on ps.device:\n" + "\n".join(problems)
    return audit


def common(ckpt, out):
    return ["--ckpt_dir", ckpt, "--save_dir", out, "--dtype", "float32", "--use_chat_template",
            "--max_seq_len", "96", "--max_steps", "2"]


def check_sft_mp2_sp2(ckpt, out):
    import solver_train
    from llama_rlhf.parallel.state import init_parallel
    from llama_rlhf.training.sft import train
    ps = init_parallel(2, 2)
    args = solver_train.parse_args(common(ckpt, os.path.join(out, "sft")) + [
        "--train_file", os.path.join(DATA, "sft_arithmetic.jsonl"), "--max_batch_size", "2"])
    audited(lambda: train(args, ps, torch.float32), ps)


def check_grpo_dp2_sp2(ckpt, out):
    import solver_grpo
    from llama_rlhf.parallel.state import init_parallel
    from llama_rlhf.training.grpo import train_grpo
    ps = init_parallel(1, 2)
    args = solver_grpo.parse_args(common(ckpt, os.path.join(out, "grpo")) + [
        "--train_file", os.path.join(DATA, "grpo_arithmetic.jsonl"), "--reward_funcs", "format,length",
        "--num_samples_per_prompt", "2", "--max_batch_size", "1", "--max_new_tokens", "6", "--beta", "0.1",
        "--scale_rewards", "batch", "--num_iterations", "2"])
    audited(lambda: train_grpo(args, ps, torch.float32), ps)


def check_generation_mp2_dp2(ckpt, out):
    import solver_generate
    from llama_rlhf.inference.batch_generate import run_generation
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.parallel.state import init_parallel
    from llama_rlhf.tokenizer import load_tokenizer
    ps = init_parallel(2, 1)
    args = solver_generate.parse_args(["--ckpt_dir", ckpt, "--label_file", os.path.join(DATA, "prompts.jsonl"),
                                       "--log_dir", os.path.join(out, "gen"), "--max_new_tokens", "4",
                                       "--max_batch_size", "4", "--temperature", "0.8", "--top_p", "0.9",
                                       "--use_chat_template", "--max_seq_len", "96"])
    tok = load_tokenizer(ckpt, model_type="llama-hf")
    model = load_pretrained(ckpt, "llama-hf", ps)
    audit = audited(lambda: run_generation(args, model, tok, ps, torch.float32), ps)
    expected = {"broadcast"} | ({"gather_object"} if ps.mp_rank == 0 else set())  # rows gather on MP rank 0
    assert expected <= {c.function for c in audit.calls}, audit.calls


CHECKS = [check_sft_mp2_sp2, check_grpo_dp2_sp2, check_generation_mp2_dp2]


@pytest.fixture(scope="module")
def report(tmp_path_factory, smollm2_dir):
    ckpt = write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir)
    return run_checks(4, CHECKS, ckpt, str(tmp_path_factory.mktemp("runs")))


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_collectives_get_device_tensors(report, name):
    assert_check(report, name)
