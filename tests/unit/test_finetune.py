"""Fine-tuning's pure parts: the exact key check, MAE's layer-decay scales, the label subset, the recipe's pieces."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bimdist.config import load_config
from bimdist.finetune import recipe
from bimdist.finetune.data import LabelIndex, label_subset
from bimdist.finetune.model import FinetuneError, Pretrained, build, from_export, from_run
from bimdist.model.backbone import Backbone
from bimdist.runs import initial_units
from tests.conftest import TINY

CFG = load_config(str(TINY))


def backbone_state(depth: int) -> tuple[dict, dict]:
    b = Backbone(CFG, initial_units(CFG))
    return b.timm_state_dict(depth), b.timm_kwargs(depth)


def test_pretrained_blocks_load_exactly_and_the_head_is_new():
    state, kwargs = backbone_state(4)
    model = build(Pretrained(kwargs, state, "run", 4), num_classes=10, drop_path=0.1, input_size=None)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("norm."))
    assert float(model.head.weight.detach().std()) < 1e-4 and float(model.head.bias.detach().abs().max()) == 0
    assert torch.equal(model.fc_norm.weight, torch.ones(32))  # MAE: a fresh fc_norm after pooling
    assert isinstance(model.norm, torch.nn.Identity)


def test_a_decoder_key_or_a_missing_block_is_an_error_that_names_it():
    state, kwargs = backbone_state(4)
    with pytest.raises(FinetuneError, match=r"unexpected \['decoder\.pred\.weight'\]"):
        build(Pretrained(kwargs, {**state, "decoder.pred.weight": torch.zeros(3)}, "x", 4), num_classes=10,
              drop_path=0.0, input_size=None)
    missing = {k: v for k, v in state.items() if not k.startswith("blocks.3.")}
    with pytest.raises(FinetuneError, match=r"missing \['blocks\.3\.attn\.proj\.bias'"):
        build(Pretrained(kwargs, missing, "x", 4), num_classes=10, drop_path=0.0, input_size=None)


def test_an_export_loads_with_its_kwargs_and_a_wrong_depth_is_named(tmp_path: Path):
    import json

    state, kwargs = backbone_state(2)
    path = tmp_path / "b.safetensors"
    save_file(state, str(path), metadata={"depth_blocks": "2", "bimdist_step": "7"})
    (tmp_path / "b.json").write_text(json.dumps(kwargs))
    pre = from_export(path, None, weights=True)
    assert pre.depth == 2 and pre.step == 7 and pre.kwargs["depth"] == 2
    build(pre, num_classes=10, drop_path=0.0, input_size=None)
    with pytest.raises(FinetuneError, match="--depth 3 but .* holds blocks 1..2"):
        from_export(path, 3, weights=True)
    (tmp_path / "b.json").unlink()
    with pytest.raises(FinetuneError, match=r"b\.json not found"):
        from_export(path, None, weights=True)


def test_position_embeddings_are_resampled_for_another_resolution():
    state, kwargs = backbone_state(4)
    model = build(Pretrained(kwargs, state, "run", 4), num_classes=10, drop_path=0.0, input_size=32)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 32)  # 16 px / 4 -> 32 px / 4
    assert torch.equal(model.pos_embed[:, 0], state["pos_embed"][:, 0])  # the class token's entry is kept


def test_shapes_only_for_scratch():
    pre = from_run(CFG, Path("unused"), 3, weights=False)
    assert pre.state is None and pre.kwargs["depth"] == 3
    with pytest.raises(FinetuneError, match="out of range"):
        from_run(CFG, Path("unused"), 5, weights=False)


def mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's util/lr_decay.py get_layer_id_for_vit, verbatim in logic."""
    if name in ("cls_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def test_layer_decay_scales_equal_maes_formula():
    state, kwargs = backbone_state(4)
    model = build(Pretrained(kwargs, state, "run", 4), num_classes=10, drop_path=0.0, input_size=None)
    f = load_config(str(TINY), ["--finetune.layer_decay=0.65"]).finetune
    opt = recipe.optimizer(model, f)
    depth = len(model.blocks)
    scales = recipe.layer_scales(depth, 0.65)
    assert scales == [0.65 ** (depth + 1 - i) for i in range(depth + 2)]
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr_scale"] == pytest.approx(scales[mae_layer_id(name, depth + 1)]), name
            no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")  # MAE's no_weight_decay list and 1-D
            assert group["weight_decay"] == (0.0 if no_decay else f.weight_decay), name
            seen += 1
    assert seen == len(names)


def test_timms_scheduler_applies_each_groups_lr_scale():
    state, kwargs = backbone_state(2)
    model = build(Pretrained(kwargs, state, "run", 2), num_classes=10, drop_path=0.0, input_size=None)
    f = load_config(str(TINY), ["--finetune.warmup_epochs=1"]).finetune
    opt = recipe.optimizer(model, f)
    sched = recipe.scheduler(opt, f, steps=100, steps_per_epoch=10)
    sched.step_update(10)  # the end of warm-up: the peak lr, scaled per layer
    peak = recipe.base_lr(f)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(peak * group["lr_scale"])
    sched.step_update(99)
    assert max(g["lr"] for g in opt.param_groups) < 0.01 * peak


def test_the_label_subset_is_class_balanced_and_depends_on_its_own_seed_only():
    labels = [i % 10 for i in range(1000)] + [3] * 100  # class 3 has twice the others
    index = LabelIndex([f"k{i}" for i in range(len(labels))], labels)
    a = label_subset(index, 0.1, seed=0)
    assert a == label_subset(index, 0.1, seed=0)  # a function of the seed
    assert a != label_subset(index, 0.1, seed=1)
    per = {y: sum(1 for k in a if labels[int(k[1:])] == y) for y in range(10)}
    assert per == {y: 20 if y == 3 else 10 for y in range(10)}
    assert len(label_subset(index, 0.001, seed=0)) == 10  # at least one of each class


def test_bad_finetune_values_exit_2_with_the_field():
    from bimdist.config import ConfigError

    for bad, field in (("--finetune.labels=0", "finetune.labels"), ("--finetune.labels=1.5", "finetune.labels"),
                       ("--finetune.layer_decay=0", "finetune.layer_decay"), ("--finetune.bogus=1", "finetune.bogus")):
        with pytest.raises(ConfigError, match=re.escape(field)):
            load_config(str(TINY), [bad])
