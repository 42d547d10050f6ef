"""Parallel layers and vocab-parallel losses against the unsharded torch computation (fp64, <= 1e-10).

Every rank builds the same full tensors from one seed, shards them, and compares its local outputs,
weight gradients and input gradients with the slices of the unsharded computation.
"""
import pytest
import torch
import torch.nn.functional as F

from llama_rlhf.parallel.comm import all_reduce, copy_to_group, gather_from_group, reduce_from_group, scatter_to_group
from llama_rlhf.parallel.cross_entropy import (mean_over_tokens, vocab_parallel_cross_entropy, vocab_parallel_entropy,
                                                vocab_parallel_log_probs)
from llama_rlhf.parallel.layers import (ColumnParallelLinear, RowParallelLinear, ShardInfo, VocabParallelEmbedding,
                                        padded_vocab_size, take_shard)
from tests.distributed import assert_check, grid, run_checks

TOL = 1e-10


def close(actual, expected, what, tol=TOL):
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert diff <= tol, f"{what}: max abs diff {diff:.3e} > {tol:.0e}"


def layouts():
    world = torch.distributed.get_world_size()
    return [grid(mp, 1) for mp in (2, 4) if world % mp == 0]


def check_primitives():
    torch.set_default_dtype(torch.float64)
    for ps in layouts():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 8, generator=g)
        up = torch.randn(3, 8, generator=g)  # upstream gradient, same on every rank
        r, n = ps.mp_rank, ps.mp_size
        # copy: fwd identity, bwd sum of every rank's gradient
        xi = x.clone().requires_grad_()
        (copy_to_group(xi, ps.mp_group) * up * (r + 1)).sum().backward()
        close(xi.grad, up * sum(range(1, n + 1)), "copy_to_group backward")
        # reduce: fwd sum, bwd identity
        xi = (x * (r + 1)).requires_grad_()
        y = reduce_from_group(xi, ps.mp_group)
        close(y, x * sum(range(1, n + 1)), "reduce_from_group forward")
        (y * up).sum().backward()
        close(xi.grad, up, "reduce_from_group backward")
        assert torch.equal(x, x.clone()), "inputs untouched"
        # gather / scatter along the last dim
        local = x[:, r * 8 // n:(r + 1) * 8 // n].clone().requires_grad_()
        full = gather_from_group(local, ps.mp_group)
        close(full, x, "gather_from_group forward")
        (full * up).sum().backward()
        close(local.grad, up[:, r * 8 // n:(r + 1) * 8 // n], "gather_from_group backward")
        xi = x.clone().requires_grad_()
        part = scatter_to_group(xi, ps.mp_group)
        close(part, x[:, r * 8 // n:(r + 1) * 8 // n], "scatter_to_group forward")
        (part * up[:, r * 8 // n:(r + 1) * 8 // n]).sum().backward()
        close(xi.grad, up, "scatter_to_group backward")


def check_column_parallel_linear():
    torch.set_default_dtype(torch.float64)
    for ps in layouts():
        for bias in (False, True):
            g = torch.Generator().manual_seed(1)
            ref = torch.nn.Linear(6, 12, bias=bias)
            with torch.no_grad():
                for p in ref.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
            x = torch.randn(2, 5, 6, generator=g)
            up = torch.randn(2, 5, 12, generator=g)
            layer = ColumnParallelLinear(6, 12, ps.mp_group, bias=bias, copy_input=True)
            with torch.no_grad():
                layer.weight.copy_(take_shard(ref.weight, layer.weight.shard))
                if bias:
                    layer.bias.copy_(take_shard(ref.bias, layer.bias.shard))
            xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
            y_ref = ref(xr)
            (y_ref * up).sum().backward()
            y = layer(xl)
            s0, s1 = layer.weight.shard.start, layer.weight.shard.stop
            close(y, y_ref[..., s0:s1], "column output")
            (y * up[..., s0:s1]).sum().backward()
            close(layer.weight.grad, ref.weight.grad[s0:s1], "column weight grad")
            if bias:
                close(layer.bias.grad, ref.bias.grad[s0:s1], "column bias grad")
            close(xl.grad, xr.grad, "column input grad")


def check_replicated_column_slices():
    """KV heads replicated over MP (parts < MP): each rank holds the slice of head mp_rank // replicas."""
    torch.set_default_dtype(torch.float64)
    for ps in layouts():
        parts = 1 if ps.mp_size == 2 else 2
        part = ps.mp_rank // (ps.mp_size // parts)
        layer = ColumnParallelLinear(4, 8, ps.mp_group, parts=parts, part=part)
        info = layer.weight.shard
        assert (info.start, info.stop, info.copies) == (part * 8 // parts, (part + 1) * 8 // parts,
                                                        ps.mp_size // parts)


def check_row_parallel_linear():
    torch.set_default_dtype(torch.float64)
    for ps in layouts():
        for bias in (False, True):
            g = torch.Generator().manual_seed(2)
            ref = torch.nn.Linear(12, 5, bias=bias)
            with torch.no_grad():
                for p in ref.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
            x = torch.randn(2, 3, 12, generator=g)
            up = torch.randn(2, 3, 5, generator=g)
            layer = RowParallelLinear(12, 5, ps.mp_group, bias=bias)
            with torch.no_grad():
                layer.weight.copy_(take_shard(ref.weight, layer.weight.shard))
                if bias:
                    layer.bias.copy_(ref.bias)
            s0, s1 = layer.weight.shard.start, layer.weight.shard.stop
            xr, xl = x.clone().requires_grad_(), x[..., s0:s1].clone().requires_grad_()
            y_ref = ref(xr)
            (y_ref * up).sum().backward()
            y = layer(xl)
            close(y, y_ref, "row output")
            (y * up).sum().backward()
            close(layer.weight.grad, ref.weight.grad[:, s0:s1], "row weight grad")
            if bias:
                close(layer.bias.grad, ref.bias.grad, "row bias grad")
            close(xl.grad, xr.grad[..., s0:s1], "row input grad")


def check_vocab_parallel_embedding():
    torch.set_default_dtype(torch.float64)
    for ps in layouts():
        vocab = 37  # not divisible by 2 or 4: padded to 38 / 40
        g = torch.Generator().manual_seed(3)
        ref = torch.nn.Embedding(vocab, 6)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(vocab, 6, generator=g))
        ids = torch.randint(0, vocab, (3, 9), generator=g)
        ids[0, :3] = torch.tensor([0, vocab - 1, vocab // 2])
        up = torch.randn(3, 9, 6, generator=g)
        layer = VocabParallelEmbedding(vocab, 6, ps.mp_group)
        assert layer.vocab_stop - layer.vocab_start == padded_vocab_size(vocab, ps.mp_size) // ps.mp_size
        with torch.no_grad():
            layer.weight.copy_(take_shard(ref.weight, layer.weight.shard))
        y_ref = ref(ids)
        (y_ref * up).sum().backward()
        y = layer(ids)
        close(y, y_ref, "embedding output")
        (y * up).sum().backward()
        close(layer.weight.grad, take_shard(ref.weight.grad, layer.weight.shard), "embedding weight grad")


def vocab_slice(full_logits, ps, vocab):
    """This rank's vocab slice of full logits, with padded columns at -inf (as the model produces them)."""
    vp = padded_vocab_size(vocab, ps.mp_size)
    info = ShardInfo((vocab,), 0, ps.mp_rank * vp // ps.mp_size, (ps.mp_rank + 1) * vp // ps.mp_size)
    local = take_shard(full_logits.transpose(0, -1), info).transpose(0, -1).clone()
    pad = torch.arange(info.start, info.stop) >= vocab
    return local.masked_fill(pad, float("-inf")), info


def check_vocab_parallel_cross_entropy():
    torch.set_default_dtype(torch.float64)
    for ps in layouts():
        vocab = 37
        g = torch.Generator().manual_seed(4)
        logits = torch.randn(4, 5, vocab, generator=g) * 3
        target = torch.randint(0, vocab, (4, 5), generator=g)
        target[0, 0], target[1, 3], target[2, :] = -100, vocab - 1, -100  # ignored tokens, last vocab entry
        up = torch.randn(4, 5, generator=g)
        full = logits.clone().requires_grad_()
        ref = F.cross_entropy(full.view(-1, vocab), target.view(-1), reduction="none", ignore_index=-100).view(4, 5)
        (ref * up).sum().backward()
        local, info = vocab_slice(logits, ps, vocab)
        local.requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, ps.mp_group)
        close(loss, ref, "cross-entropy per token")
        (loss * up).sum().backward()
        grad_ref, _ = vocab_slice(full.grad, ps, vocab)
        grad_ref = grad_ref.masked_fill(torch.isinf(grad_ref), 0.0)
        close(local.grad, grad_ref, "cross-entropy logits grad")
        # overwrite_logits: the same gradient, written over an intermediate's storage
        source = local.detach().clone().requires_grad_()
        intermediate = source * 1.0
        (vocab_parallel_cross_entropy(intermediate, target, ps.mp_group, overwrite_logits=True) * up).sum().backward()
        close(source.grad, grad_ref, "cross-entropy logits grad, overwrite_logits")
        close(intermediate.detach(), grad_ref, "overwritten logits hold the gradient")
        # mean over non-ignored tokens of the whole batch
        local.grad = None
        mean = mean_over_tokens(vocab_parallel_cross_entropy(local, target, ps.mp_group), target, None)
        close(mean, F.cross_entropy(logits.view(-1, vocab), target.view(-1), ignore_index=-100), "mean loss")


def check_vocab_parallel_log_probs_and_entropy():
    torch.set_default_dtype(torch.float64)
    for ps in layouts():
        vocab = 37
        g = torch.Generator().manual_seed(5)
        logits = torch.randn(3, 7, vocab, generator=g) * 2
        target = torch.randint(0, vocab, (3, 7), generator=g)
        up = torch.randn(3, 7, generator=g)
        full = logits.clone().requires_grad_()
        ref = torch.log_softmax(full, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        (ref * up).sum().backward()
        local, _ = vocab_slice(logits, ps, vocab)
        local.requires_grad_()
        lp = vocab_parallel_log_probs(local, target, ps.mp_group)
        close(lp, ref, "log-probs")
        (lp * up).sum().backward()
        grad_ref, _ = vocab_slice(full.grad, ps, vocab)
        close(local.grad, grad_ref.masked_fill(torch.isinf(grad_ref), 0.0), "log-probs grad")
        p = torch.softmax(logits, -1)
        close(vocab_parallel_entropy(local, ps.mp_group), -(p * p.log()).sum(-1), "entropy")
        # differentiable (GRPO's entropy bonus): the gradient autograd takes through the full softmax
        full = logits.clone().requires_grad_()
        (-(torch.softmax(full, -1) * torch.log_softmax(full, -1)).sum(-1) * up).sum().backward()
        mine = local.detach().clone().requires_grad_()
        (vocab_parallel_entropy(mine, ps.mp_group, differentiable=True) * up).sum().backward()
        grad_ref, _ = vocab_slice(full.grad, ps, vocab)
        close(mine.grad, grad_ref.masked_fill(torch.isinf(grad_ref), 0.0), "entropy grad")


def check_out_of_place_all_reduce():
    ps = layouts()[0]
    x = torch.ones(3)
    y = all_reduce(x, ps.mp_group)
    assert torch.equal(x, torch.ones(3)) and torch.equal(y, torch.full((3,), float(ps.mp_size)))


CHECKS = [check_primitives, check_column_parallel_linear, check_replicated_column_slices, check_row_parallel_linear,
          check_vocab_parallel_embedding, check_vocab_parallel_cross_entropy,
          check_vocab_parallel_log_probs_and_entropy, check_out_of_place_all_reduce]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def report(request):
    return run_checks(request.param, CHECKS)


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_parallel_layer(report, name):
    assert_check(report, name)


def test_entropy_in_row_chunks_equals_the_whole_softmax(monkeypatch):
    """The entropy's forward runs in cache-sized row chunks over two reused buffers: with chunks of a few rows
    (and padded vocab entries at -inf, fp32 and bf16 logits) it equals the entropy of the whole softmax."""
    import llama_rlhf.parallel.cross_entropy as ce
    monkeypatch.setitem(ce.CHUNK_ELEMENTS, "cpu", 3 * 11)  # 3 rows of 11 per chunk: 4 chunks for 10 rows
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    logits[..., -2:] = float("-inf")
    for x in (logits, logits.bfloat16()):
        p = torch.softmax(x.float(), -1)
        want = -(p * torch.log_softmax(x.float(), -1)).nan_to_num(0.0).sum(-1)
        got = vocab_parallel_entropy(x, None)
        assert got.shape == (2, 5) and got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
