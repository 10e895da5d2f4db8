"""model.decoder_chunks: same loss and gradients as the plain decoder, less activation memory kept."""

import pytest
import torch

from bimdist.config import load_config
from bimdist.model.chunked import batch_slices
from bimdist.model.unit import build_unit
from tests.conftest import TINY
from tests.unit.test_model import _batch


def test_batch_slices_cover_the_batch_without_empty_slices():
    assert batch_slices(7, 3) == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert batch_slices(2, 5) == [slice(0, 1), slice(1, 2)]
    assert batch_slices(4, 1) == [slice(0, 4)]


def _loss_and_grads(cfg, index, images, ids, tokens):
    unit = build_unit(cfg, index)
    tok = None if tokens is None else tokens.clone().requires_grad_(True)
    out = unit(images, ids, tok)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in unit.named_parameters()}
    return out, grads, None if tok is None else tok.grad


def _saved_bytes(unit, images, ids, tokens):
    params = {p.untyped_storage().data_ptr() for p in unit.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unit(images, ids, tokens)
    return sum(seen.values())


@pytest.mark.parametrize("method,index", [("bim", 0), ("bim", 1), ("mae", 0)])
def test_chunked_decoder_matches_plain_decoder(method, index):
    extra = ["--masking.extra_drop=null"] if method == "mae" else []
    plain = load_config(str(TINY), [f"--method={method}", *extra])
    chunked = load_config(str(TINY), [f"--method={method}", *extra, "--model.decoder_chunks=3"])
    images, ids = _batch(plain, n=7)  # 7 rows in 3 slices: uneven slices must weigh rows correctly
    tokens = None
    if index > 0:
        tokens = build_unit(plain, 0)(images, ids).tokens
    ref, ref_grads, _ = _loss_and_grads(plain, index, images, ids, tokens)
    out, grads, _ = _loss_and_grads(chunked, index, images, ids, tokens)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.pred, ref.pred.detach())
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(out.tokens, ref.tokens)


def test_chunked_decoder_keeps_less_for_backward():
    plain = load_config(str(TINY))
    chunked = load_config(str(TINY), ["--model.decoder_chunks=4"])
    images, ids = _batch(plain, n=8)
    assert _saved_bytes(build_unit(chunked, 0), images, ids, None) < 0.8 * _saved_bytes(
        build_unit(plain, 0), images, ids, None)


def test_chunked_decoder_under_bf16_autocast():
    """The backward recomputes under the forward's autocast state; the gradients stay close to fp32."""
    cfg = load_config(str(TINY), ["--model.decoder_chunks=2"])
    images, ids = _batch(cfg, n=4)
    unit = build_unit(cfg, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unit(images, ids)
    out.loss.backward()
    assert out.pred.dtype == torch.bfloat16
    ref = build_unit(cfg, 0)
    ref(images, ids).loss.backward()
    for (name, p), q in zip(unit.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0) > 0.95, name


def test_chunked_decoder_without_grad_returns_the_same_loss():
    plain = load_config(str(TINY))
    chunked = load_config(str(TINY), ["--model.decoder_chunks=3"])
    images, ids = _batch(plain, n=5)
    with torch.no_grad():
        torch.testing.assert_close(build_unit(chunked, 0)(images, ids).loss, build_unit(plain, 0)(images, ids).loss)


def test_chunked_decoder_runs_under_the_flop_counter_and_counts_the_recompute():
    """The stage loop counts the first step's FLOPs; the recomputed decoder forward must show up in them."""
    from torch.utils.flop_counter import FlopCounterMode

    plain = load_config(str(TINY))
    chunked = load_config(str(TINY), ["--model.decoder_chunks=2"])
    images, ids = _batch(plain, n=4)
    flops = []
    for cfg in (plain, chunked):
        with FlopCounterMode(display=False) as counter:
            build_unit(cfg, 0)(images, ids).loss.backward()
        flops.append(counter.get_total_flops())
    assert flops[1] > flops[0]
