import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from bimdist.config import load_config
from bimdist.model.backbone import Backbone
from bimdist.model.decoder import patchify, unpatchify
from bimdist.model.masking import shuffle_ids
from bimdist.model.unit import build_unit, normalize_images, unit_indices
from tests.conftest import TINY


def _batch(cfg, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    images = torch.randint(0, 256, (n, m.in_chans, m.img_size, m.img_size), dtype=torch.uint8, generator=g)
    return images, shuffle_ids(n, m.num_patches, generator=g)


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 16, 16)
    p = patchify(x, 4)
    assert p.shape == (2, 16, 48)
    assert torch.equal(unpatchify(p, 4, 3), x)


def test_block_loss_reaches_only_its_own_block():
    """Run all blocks as the trainer does (detached inputs); each loss's gradient stays inside its unit."""
    cfg = load_config(str(TINY))
    units = [build_unit(cfg, i) for i in unit_indices(cfg)]
    images, ids = _batch(cfg)
    tokens, outs = None, []
    for u in units:
        out = u(images, ids, tokens)
        outs.append(out)
        tokens = out.tokens
        assert not tokens.requires_grad
    for k, out in enumerate(outs):
        for u in units:
            u.zero_grad(set_to_none=True)
        out.loss.backward(retain_graph=True)
        for j, u in enumerate(units):
            touched = [n for n, p in u.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
            if j == k:
                enc = [n for n, p in u.named_parameters() if n.startswith(("encoder.", "embed."))]
                assert set(enc) <= set(touched), f"block {k} loss misses some of its own encoder parameters"
            else:
                assert touched == [], f"block {k} loss reached block {j}: {touched[:3]}"


def test_mae_mode_trains_every_encoder_parameter():
    cfg = load_config(str(TINY), ["--method=mae", "--masking.extra_drop=null"])
    (unit,) = [build_unit(cfg, i) for i in unit_indices(cfg)]
    assert len(unit.encoder.blocks) == cfg.model.depth
    images, ids = _batch(cfg)
    unit(images, ids).loss.backward()
    missing = [n for n, p in unit.named_parameters() if n.startswith(("encoder.", "embed.")) and p.grad is None]
    assert missing == []


def test_incremental_masking_shrinks_tokens_per_block():
    cfg = load_config(str(TINY))  # extra_drop [0, .25, .25, .5] over 8 visible of 16 patches
    units = [build_unit(cfg, i) for i in unit_indices(cfg)]
    images, ids = _batch(cfg)
    tokens, widths = None, []
    for u in units:
        out = u(images, ids, tokens)
        widths.append(out.tokens.shape[1])
        tokens = out.tokens
    assert widths == [1 + 8, 1 + 6, 1 + 6, 1 + 4]


def test_norm_pix_loss_switch_changes_the_target():
    images, ids = _batch(load_config(str(TINY)))
    on = build_unit(load_config(str(TINY)), 0)(images, ids).loss
    off = build_unit(load_config(str(TINY), ["--model.norm_pix_loss=false"]), 0)(images, ids).loss
    assert not torch.isclose(on, off)


@pytest.mark.parametrize("method", ["bim", "mae"])
def test_export_matches_timm_at_every_depth(method):
    extra = ["--masking.extra_drop=null"] if method == "mae" else []
    cfg = load_config("fmnist-tiny", [f"--method={method}", "--data.source=synthetic", *extra])
    units = [build_unit(cfg, i) for i in unit_indices(cfg)]
    backbone = Backbone(cfg, units).eval()
    images, _ = _batch(cfg, n=3)
    ours = backbone.features(images)
    x = normalize_images(images, backbone.mean, backbone.std)
    for depth in range(1, cfg.model.blocks + 1):
        model = VisionTransformer(**backbone.timm_kwargs(depth)).eval()
        model.load_state_dict(backbone.timm_state_dict(depth), strict=True)
        assert len(model.blocks) == backbone.cuts[depth - 1]
        with torch.no_grad():
            theirs = model.forward_features(x)
            pooled = model.forward_head(theirs, pre_logits=True)
        assert torch.allclose(theirs, ours[depth - 1], atol=1e-5)
        assert torch.allclose(pooled, ours[depth - 1][:, 1:].mean(1), atol=1e-5)
