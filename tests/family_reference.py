"""Family parity helpers: transformers' outputs for a tiny saved model (parent process) and the check that our
sharded load of the same weights reproduces them (worker processes, which never import transformers).

A reference file holds ids, position ids, labels, transformers' logits and loss, and every parameter gradient
under its HF name. ``check_parity`` loads the checkpoint with llama_rlhf at each (MP, SP) layout and compares
logits (gathered over the vocab-parallel ranks), the loss, and each rank's gradient slices; the largest
differences are written next to the reference so the test can report them.
"""
from __future__ import annotations

import json
import os

import torch

from tests.hf_reference import sample_batch

TOL = 1e-4


def set_seeded_weights(model, seed: int, std: float = 0.2) -> None:
    """Random weights large enough that every difference shows (norm weights near their identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                identity = 0.0 if getattr(model.config, "model_type", "") == "gemma2" else 1.0
                p.copy_(identity + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def build_hf_model(folder: str, config, model_cls, seed: int):
    """Build ``model_cls(config)`` with seeded weights, save it to ``folder``, return it (fp32, eval)."""
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    set_seeded_weights(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def load_hf(folder: str, **overrides):
    """transformers' model from ``folder`` (eager attention, fp32), with config attributes overridden."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(folder)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                attn_implementation="eager")


def batch(vocab: int, seq: int = 12, seed: int = 0, position_offset: int = 0):
    ids, labels = sample_batch(vocab, batch=2, seq=seq, seed=seed)
    positions = torch.arange(position_offset, position_offset + seq).expand(2, seq).clone()
    return ids, labels, positions


def hf_logits(model, ids, positions) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions).logits


def write_reference(model, ids, labels, positions, out_file: str) -> dict:
    """transformers' logits, loss and parameter gradients for one batch, saved for the workers."""
    model.train()  # dropout is 0 in these configs; gradients flow as in training
    out = model(input_ids=ids, position_ids=positions, labels=labels)
    out.loss.backward()
    ref = {"ids": ids, "labels": labels, "positions": positions, "logits": out.logits.detach(),
           "loss": out.loss.detach()}
    for name, p in model.named_parameters():
        ref["grad." + name] = p.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    model.eval()
    torch.save(ref, out_file)
    return ref


def assert_changes(reference: torch.Tensor, other: torch.Tensor, what: str, at_least: float = 1e-2) -> None:
    """The ablated model must differ: proves the test input really exercises ``what``."""
    d = (reference - other).abs().max().item()
    assert d > at_least, f"{what} does not change the logits (max diff {d:.2e}): the test would not catch it"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


def check_parity(case: dict, layouts) -> None:
    """Load ``case['folder']`` as ``case['model_type']`` at every (mp, sp) layout; compare with the reference.

    Under SP each rank feeds its zigzag chunks (true positions) and compares them with the same chunks of the
    reference; labels are shifted on the whole sequence before splitting, the loss is summed over the SP ring
    and so are the gradients (each rank's are its tokens' share).
    """
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.parallel.comm import all_reduce, gather_from_group
    from llama_rlhf.parallel.cross_entropy import mean_over_tokens, vocab_parallel_cross_entropy
    from llama_rlhf.parallel.layers import take_shard
    from llama_rlhf.parallel.sequence_split import zigzag_split
    from llama_rlhf.training.grad_sync import GradientSync
    from tests.distributed import grid

    ref = torch.load(case["ref"], weights_only=True)
    name, diffs = case["name"], {}
    for mp, sp in layouts:
        ps = grid(mp, sp)
        model = load_pretrained(case["folder"], case["model_type"], ps)
        labels = ref["labels"]
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # shifted: [B, S]
        ids, positions, ref_logits = ref["ids"], ref["positions"], ref["logits"]
        if sp > 1:  # [B, S] -> this rank's zigzag chunks [B, S / sp]
            ids, positions, targets, ref_logits = (zigzag_split(t, sp, ps.sp_rank)
                                                   for t in (ids, positions, targets, ref_logits))
        logits = model(ids, position_ids=positions)  # [B, S / sp, V_padded / mp]
        full = gather_from_group(logits.detach(), ps.mp_group)[..., :model.cfg.vocab_size]
        d_logits = max_diff(full, ref_logits)
        assert d_logits <= TOL, f"{name} MP={mp} SP={sp}: logits differ by {d_logits:.2e}"
        sp_group = ps.sp_group if sp > 1 else None
        loss = mean_over_tokens(vocab_parallel_cross_entropy(logits, targets, ps.mp_group), targets, sp_group)
        total = all_reduce(loss.detach(), sp_group) if sp > 1 else loss.detach()
        d_loss = abs(total.item() - ref["loss"].item())
        assert d_loss <= TOL, f"{name} MP={mp} SP={sp}: loss {total.item():.6f} vs transformers {ref['loss']:.6f}"
        loss.backward()
        GradientSync(model, ps).reduce_model_parallel()
        d_grad = 0.0
        for pname, p in model.named_parameters():
            grad = all_reduce(p.grad, sp_group) if sp > 1 else p.grad
            expected = take_shard(ref["grad." + pname], p.shard)
            d = max_diff(grad, expected)
            assert d <= TOL, f"{name} MP={mp} SP={sp}: gradient of {pname} differs by {d:.2e}"
            d_grad = max(d_grad, d)
        diffs[f"mp{mp}_sp{sp}"] = {"logits": d_logits, "loss": d_loss, "grad": d_grad}
    if torch.distributed.get_rank() == 0:
        with open(case["ref"] + ".diffs.json", "w") as f:
            json.dump(diffs, f)


def read_diffs(case: dict) -> dict:
    path = case["ref"] + ".diffs.json"
    return json.load(open(path)) if os.path.isfile(path) else {}
