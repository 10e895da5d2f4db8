"""One training step over a stage's units: every unit learns, and no gradient outlives its unit's step."""

from __future__ import annotations

import torch

from bimdist.config import load_config
from bimdist.model.masking import shuffle_ids
from bimdist.model.unit import unit_indices
from bimdist.telemetry.livebytes import LiveTensorBytes
from bimdist.train.worker import StageWorker
from tests.conftest import TINY


def test_step_updates_every_unit_and_frees_gradients():
    cfg = load_config(str(TINY))
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    images = torch.randint(0, 256, (8, m.in_chans, m.img_size, m.img_size), dtype=torch.uint8, generator=g)
    ids = shuffle_ids(8, m.num_patches, generator=g)
    with LiveTensorBytes() as live:
        worker = StageWorker(cfg, unit_indices(cfg), device=torch.device("cpu"))
        before = [{n: p.detach().clone() for n, p in u.named_parameters()} for u in worker.units]
        result = worker.train_step(step=0, images=images, ids_shuffle=ids, tokens=None)
        del images, ids
        after_step = live.live
    assert len(result.losses) == len(worker.units) > 1 and all(s.skipped.item() == 0 for s in result.stats)
    for unit, old in zip(worker.units, before):
        assert any(not torch.equal(p, old[n]) for n, p in unit.named_parameters())
        assert all(p.grad is None for p in unit.parameters())  # freed right after the unit's step
    # what stays alive between steps: parameters, AdamW's two moments, the parameter copies in `before`, module
    # buffers and AdamW's per-parameter step counters; no gradients, no activations
    params = [p for u in worker.units for p in u.parameters()]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    buffer_bytes = sum(b.numel() * b.element_size() for u in worker.units for b in u.buffers())
    assert 4 * param_bytes <= after_step <= 4 * param_bytes + buffer_bytes + 8 * len(params)


def test_a_non_finite_step_is_skipped_on_the_device_and_not_counted():
    """The fused AdamW's found_inf: the parameters and the step counter stay as they were; the next finite step
    trains."""
    cfg = load_config(str(TINY))
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    images = torch.randint(0, 256, (8, m.in_chans, m.img_size, m.img_size), dtype=torch.uint8, generator=g)
    ids = shuffle_ids(8, m.num_patches, generator=g)
    worker = StageWorker(cfg, [0], device=torch.device("cpu"))
    worker.train_step(step=0, images=images, ids_shuffle=ids, tokens=None)
    unit, engine = worker.units[0], worker.engines[0]
    before = {n: p.detach().clone() for n, p in unit.named_parameters()}
    steps_before = [s["step"].clone() for s in engine.optimizer.state.values()]
    with torch.no_grad():
        unit.decoder.decoder_pred.weight[0, 0] = float("nan")  # the loss and every gradient turn NaN
    result = worker.train_step(step=1, images=images, ids_shuffle=ids, tokens=None, log=True)
    assert result.stats[0].skipped.item() == 1.0 and not result.stats[0].grad_norm.isfinite()
    assert [s["step"] for s in engine.optimizer.state.values()] == steps_before
    for n, p in unit.named_parameters():
        assert torch.equal(p, before[n]) or (n == "decoder.decoder_pred.weight")
    with torch.no_grad():
        unit.decoder.decoder_pred.weight[0, 0] = 0.0
    ok = worker.train_step(step=2, images=images, ids_shuffle=ids, tokens=None)
    assert ok.stats[0].skipped.item() == 0 and ok.stats[0].grad_norm is None  # no norm asked for, no clipping
    assert any(not torch.equal(p, before[n]) for n, p in unit.named_parameters() if n != "decoder.decoder_pred.weight")
