"""The sharded decoder against transformers: tiny random Llamas at MP 1, 2, 4 and the real SmolLM2 at MP 1, 3.

Logits, loss and every parameter gradient must equal transformers' (fp32, 1e-4). A world of 4 runs every
MP size (MP=2 and MP=1 as data-parallel replicas of the same batch). Also counts the MP all-reduces.
"""
import os

import pytest
import torch

from llama_rlhf.models.config import ModelConfig
from llama_rlhf.models.init import init_weights
from llama_rlhf.models.pretrained import build_model, load_pretrained
from llama_rlhf.parallel.comm import gather_from_group
from llama_rlhf.parallel.cross_entropy import mean_over_tokens, vocab_parallel_cross_entropy
from llama_rlhf.parallel.layers import take_shard
from llama_rlhf.training.grad_sync import GradientSync
from tests.distributed import assert_check, grid, run_checks
from tests.hf_reference import write_tiny_llamas

TOL = 1e-4


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def full_logits(local, model):
    """Gather vocab-parallel logits and drop the padded vocab columns."""
    return gather_from_group(local, model.ps.mp_group)[..., :model.cfg.vocab_size]


def check_tiny_llama_parity(folders):
    torch.manual_seed(0)
    for name, folder in folders.items():
        ref = torch.load(os.path.join(folder, "reference.pt"), weights_only=True)
        for mp in (1, 2, 4):
            ps = grid(mp, 1)
            model = load_pretrained(folder, "llama-hf", ps)
            logits = model(ref["ids"])
            d = max_diff(full_logits(logits.detach(), model), ref["logits"])
            assert d <= TOL, f"{name} MP={mp}: logits differ by {d:.2e}"
            labels = ref["labels"][:, 1:]
            loss = mean_over_tokens(vocab_parallel_cross_entropy(logits[:, :-1], labels, ps.mp_group), labels, None)
            assert abs(loss.item() - ref["loss"].item()) <= TOL, f"{name} MP={mp}: loss {loss.item()} vs {ref['loss']}"
            loss.backward()
            GradientSync(model, ps).reduce_model_parallel()
            worst_grad = 0.0
            for pname, p in model.named_parameters():
                expected = take_shard(ref["grad." + pname], p.shard)
                d_grad = max_diff(p.grad, expected)
                assert d_grad <= TOL, f"{name} MP={mp}: grad of {pname} differs by {d_grad:.2e}"
                worst_grad = max(worst_grad, d_grad)
            if torch.distributed.get_rank() == 0:  # the figures, for the test to print
                with open(os.path.join(os.path.dirname(folder), "parity.txt"), "a") as f:
                    f.write(f"tiny {name} MP={mp}: max |logit diff| {d:.3e}, |loss diff| "
                            f"{abs(loss.item() - ref['loss'].item()):.3e}, max |grad diff| {worst_grad:.3e}\n")


def count_mp_all_reduces(model, ps, ids):
    """(forward, backward) numbers of all-reduces issued on the MP group by one training forward/backward."""
    calls = {"n": 0}
    real = torch.distributed.all_reduce

    def counting(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        if group is ps.mp_group:
            calls["n"] += 1
        return real(tensor, op=op, group=group, async_op=async_op)

    torch.distributed.all_reduce = counting
    try:
        hidden = model(ids, hidden_only=True)
        forward = calls["n"]
        hidden.float().pow(2).sum().backward()
        return forward, calls["n"] - forward
    finally:
        torch.distributed.all_reduce = real


def check_two_all_reduces_per_layer(*_):
    for mp in (2, 4):
        ps = grid(mp, 1)
        counts = {}
        for layers in (1, 3):
            cfg = ModelConfig("llama-hf", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=layers,
                              num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                              max_position_embeddings=64)
            model = build_model(cfg, ps)
            init_weights(model, seed=0)
            counts[layers] = count_mp_all_reduces(model, ps, torch.randint(0, 64, (2, 8)))
        (f1, b1), (f3, b3) = counts[1], counts[3]
        assert (f3 - f1, b3 - b1) == (4, 4), f"MP={mp}: per layer fwd {(f3 - f1) / 2}, bwd {(b3 - b1) / 2}; want 2, 2"
        # embedding: one forward all-reduce; decoder layers: 2 + 2 each; hidden states leave replicated
        assert (f1, b1) == (3, 2), f"MP={mp}: one-layer totals fwd {f1}, bwd {b1}"


def check_smollm2_parity(folder, ref_file):
    ref = torch.load(ref_file, weights_only=True)
    for mp in (1, 3):
        ps = grid(mp, 1)
        model = load_pretrained(folder, "llama-hf", ps)
        with torch.no_grad():
            logits = full_logits(model(ref["ids"]), model)
        d = max_diff(logits, ref["logits"])
        assert d <= 1e-3, f"SmolLM2 MP={mp}: logits differ by {d:.2e}"
        agree = (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
        assert agree == 1.0, f"SmolLM2 MP={mp}: argmax agrees at only {agree:.1%} of positions"
        with open(os.path.join(os.path.dirname(ref_file), f"mp{mp}.diff"), "w") as f:
            f.write(f"{d:.3e}\n")


TINY_CHECKS = [check_tiny_llama_parity, check_two_all_reduces_per_layer]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_llamas"))
    folders = write_tiny_llamas(root)
    return dict(run_checks(4, TINY_CHECKS, folders), _folder=root)


@pytest.mark.parametrize("name", [c.__name__ for c in TINY_CHECKS])
def test_tiny_llama(tiny_report, name):
    assert_check(tiny_report, name)
    if name == "check_tiny_llama_parity":
        print(open(os.path.join(tiny_report["_folder"], "parity.txt")).read())


def test_smollm2_logits_match_transformers(smollm2_dir, smollm2_hf, tmp_path):
    tokenizer, hf_model = smollm2_hf
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)])
    with torch.no_grad():
        logits = hf_model(ids).logits
    ref_file = str(tmp_path / "smollm2_reference.pt")
    torch.save({"ids": ids, "logits": logits}, ref_file)
    report = run_checks(3, [check_smollm2_parity], smollm2_dir, ref_file)
    assert_check(report, "check_smollm2_parity")
    for mp in (1, 3):
        print(f"SmolLM2 MP={mp}: max |logit diff| = {open(tmp_path / f'mp{mp}.diff').read().strip()}")
