import pytest
import yaml

from bimdist.cli import main
from bimdist.config import ConfigError, load_config, parse_overrides, preset_names
from tests.conftest import TINY, cli

BAD = [
    (["--method=vae"], "method", "'bim' or 'mae'"),
    (["--model.blocks=0"], "model.blocks", "greater than 0"),
    (["--model.blocks=3"], "model", "does not split evenly"),
    (["--model.layers_per_block=[1,2,2,1]"], "model", "sums to 6, not depth 4"),
    (["--model.layers_per_block=[1,3]"], "model", "must list 4 positive counts"),
    (["--model.patch_size=5"], "model", "not a multiple of patch_size"),
    (["--masking.mask_ratio=1.5"], "masking.mask_ratio", "less than 1"),
    (["--masking.extra_drop=[0.0,0.5,0.25,0.5]"], "masking.extra_drop", "non-decreasing"),
    (["--masking.extra_drop=[0.0,0.5]"], "config", "has 2 entries; model.blocks is 4"),
    (["--masking.extra_drop=[0.0,0.0,0.0,1.0]"], "masking.extra_drop", "must be in [0, 1)"),
    (["--data.source=lmdb"], "data.source", "'shards' or 'synthetic'"),
    (["--data.source=shards"], "config", "data.train_shards is empty"),
    (["--data.batch_size=15", "--pipeline.replicas=2"], "config", "does not split over pipeline.replicas 2"),
    (["--pipeline.stages=2", "--pipeline.replicas=[2,1,1]"], "config", "has 3 counts but pipeline.stages is 2"),
    (["--pipeline.stages=2", "--pipeline.replicas=[0,1]"], "config", "every stage needs at least 1 replica"),
    (["--pipeline.stages=3"], "config", "does not split over pipeline.stages=3"),
    (["--pipeline.wire_dtype=int8"], "pipeline.wire_dtype", "'fp32', 'bf16' or 'fp16'"),
    (["--method=mae", "--pipeline.stages=2", "--masking.extra_drop=null"], "config", "set pipeline.stages=1"),
    (["--method=mae"], "config", "incremental masking (masking.extra_drop) is a BIM feature"),
    (["--optim.blr=-1"], "optim.blr", "greater than 0"),
    (["--run.steps=abc"], "run.steps", "valid integer"),
    (["--run.stop_at=100"], "config", "beyond run.steps"),
    (["--model.typo=1"], "model.typo", "unknown key"),
    (["--nosuchsection.x=1"], "nosuchsection", "unknown key"),
    (["--metrics.port=70000"], "metrics.port", "less than or equal to 65535"),
]


@pytest.mark.parametrize("overrides,field,hint", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_exits_2_naming_the_field(overrides, field, hint, capsys):
    code = main(["train", str(TINY), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert f"config error: {field}:" in err, err
    assert hint in err, err
    assert "Traceback" not in err


def test_real_process_exit_code_and_no_traceback():
    proc = cli("train", str(TINY), "--model.blocks=0", timeout=120)
    assert proc.returncode == 2
    assert "config error: model.blocks" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_preset_and_missing_file(tmp_path, capsys):
    assert main(["train", "no-such-preset"]) == 2
    assert "not a file and not a preset" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_presets_load_and_overrides_apply():
    assert {"fmnist-tiny", "vit-base-16", "vit-large-16"} <= set(preset_names())
    cfg = load_config("fmnist-tiny", ["--model.layers_per_block=[2,4,4,2]", "--run.seed", "7"])
    assert cfg.model.split == [2, 4, 4, 2] and cfg.run.seed == 7
    assert cfg.model.img_size == 28 and cfg.model.patch_size == 4 and cfg.model.embed_dim == 192
    assert load_config("vit-base-16").model.embed_dim == 768
    assert load_config("vit-large-16").model.depth == 24
    assert cfg.lr == pytest.approx(1.0e-3 * 256 / 256)


def test_resolved_config_roundtrips_through_yaml(tmp_path):
    cfg = load_config(str(TINY), ["--masking.extra_drop=[0.0,0.1,0.2,0.3]"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert yaml.safe_load(path.read_text())["masking"]["extra_drop"] == [0.0, 0.1, 0.2, 0.3]


def test_override_parsing():
    assert parse_overrides(["--a.b=1", "--a.c", "[1, 2]", "--d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["positional"])
