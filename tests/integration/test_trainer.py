"""The single-process trainer end to end through the real CLI: learning, resume, eval, export, pictures."""

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from bimdist.config import load_config
from bimdist.evaluate import depth_features, knn, labelled_split
from bimdist.model.backbone import Backbone
from bimdist.model.unit import normalize_images
from bimdist.runs import initial_units, load_units, run_config
from bimdist.telemetry.losslog import read_losses
from tests.conftest import FMNIST_MINI, TINY, cli, fmnist_mini_args, load_block, max_abs_diff


def first_last_mean(run_dir: Path, block: int, n: int = 5) -> tuple[float, float]:
    rows = [r for r in read_losses(run_dir / "losses" / "stage0_r0.csv") if int(r["block"]) == block]
    losses = [float(r["loss"]) for r in rows]
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def test_loss_goes_down_on_synthetic(run_dir):
    proc = cli("train", str(TINY), f"--run.dir={run_dir}", "--run.steps=60", "--optim.blr=3e-3",
               "--optim.warmup_steps=5", "--run.recon_png=true")
    assert proc.returncode == 0, proc.stderr
    for block in range(4):
        first, last = first_last_mean(run_dir, block)
        assert last < 0.8 * first, f"block {block}: loss {first:.3f} -> {last:.3f}"
    assert "progress stage=0 replica=0 step=60/60" in proc.stderr
    png = Image.open(run_dir / "recon.png")
    assert png.size[0] > png.size[1] / 8 * 6 * 0.9  # 6 columns (original, masked, 4 blocks) for 8 rows
    assert (run_dir / "loss.png").stat().st_size > 0
    assert (run_dir / "config.yaml").exists() and "method: bim" in proc.stdout


def test_loss_goes_down_on_fashion_mnist_shards(run_dir):
    proc = cli("train", str(TINY), "--data.source=shards", *fmnist_mini_args(), "--model.img_size=28",
               "--data.mean=[0.286]", "--data.std=[0.353]", "--data.batch_size=32", "--data.shuffle_buffer=64",
               f"--run.dir={run_dir}", "--run.steps=60", "--optim.blr=3e-3", "--optim.warmup_steps=5",
               "--run.recon_png=true")
    assert proc.returncode == 0, proc.stderr
    for block in range(4):
        first, last = first_last_mean(run_dir, block)
        assert last < 0.8 * first, f"block {block}: loss {first:.3f} -> {last:.3f}"
    assert (run_dir / "recon.png").exists()


def test_resume_gives_identical_weights(tmp_path):
    common = [str(TINY), "--run.steps=10", "--checkpoint.every=3", "--checkpoint.keep=10", "--pipeline.threads=1"]
    whole = cli("train", *common, f"--run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    half = cli("train", *common, f"--run.dir={tmp_path / 'split'}", "--run.stop_at=5")
    assert half.returncode == 0, half.stderr
    assert "finished at step 5 (run.stop_at)" in half.stderr
    rest = cli("train", *common, f"--run.dir={tmp_path / 'split'}")
    assert rest.returncode == 0, rest.stderr
    assert "resumed stage 0" in rest.stderr and "(step 5)" in rest.stderr
    for block in range(4):
        a, b = load_block(tmp_path / "whole", 10, block), load_block(tmp_path / "split", 10, block)
        assert all(torch.equal(a[k], b[k]) for k in a), f"block {block} differs after resume"
    init = load_block(tmp_path / "split", 5, 0)
    assert max_abs_diff(init, load_block(tmp_path / "split", 10, 0)) > 1e-5  # the second half did train
    rows = read_losses(tmp_path / "split" / "losses" / "stage0_r0.csv")
    assert [int(r["step"]) for r in rows if r["block"] == "0"] == list(range(10))


def test_fresh_flag_sets_old_checkpoints_aside(tmp_path):
    args = [str(TINY), "--run.steps=2", f"--run.dir={tmp_path}"]
    assert cli("train", *args).returncode == 0
    proc = cli("train", *args, "--fresh")
    assert proc.returncode == 0 and "moved to" in proc.stderr and "resumed" not in proc.stderr
    assert list(tmp_path.glob("checkpoints.old-*"))


def test_incompatible_checkpoint_is_refused(tmp_path):
    assert cli("train", str(TINY), "--run.steps=2", f"--run.dir={tmp_path}").returncode == 0
    proc = cli("train", str(TINY), "--run.steps=4", "--model.embed_dim=48", f"--run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "different config" in proc.stderr and "--fresh" in proc.stderr


def test_unwritable_run_dir_is_exit_2(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = cli("train", str(TINY), "--run.steps=2", f"--run.dir={tmp_path / 'file' / 'run'}")
    assert proc.returncode == 2 and "is not writable" in proc.stderr


@pytest.fixture(scope="module")
def trained_fmnist(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fm") / "run"
    proc = cli("train", str(TINY), "--data.source=shards", *fmnist_mini_args(), "--model.img_size=28",
               "--data.mean=[0.286]", "--data.std=[0.353]", "--data.batch_size=32", f"--run.dir={run_dir}",
               "--run.steps=20", "--optim.blr=3e-3", "--eval.train_samples=256", "--eval.test_samples=128")
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_eval_prints_a_table_for_every_depth(trained_fmnist):
    proc = cli("eval", str(trained_fmnist))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| features | layers | linear probe % | kNN % |")
    names = [line.split("|")[1].strip() for line in lines[1:]]  # the |---| rule does not start with "| "
    assert names == ["raw pixels", "depth 1", "depth 2", "depth 3", "depth 4"]
    result = json.loads((trained_fmnist / "eval.json").read_text())
    grid = run_config(trained_fmnist).eval.probe_c
    for row in result["rows"]:
        assert 10.0 < row["linear"] <= 100.0 and 10.0 < row["knn"] <= 100.0  # above chance on 10 classes
        assert set(row["held_out"]) == {f"{c:g}" for c in grid}  # each candidate's held-out accuracy is kept
        assert row["held_out"][f"{row['c']:g}"] == max(row["held_out"].values())


def test_eval_overrides_touch_only_the_eval_section(trained_fmnist):
    bad_value = cli("eval", str(trained_fmnist), "--eval.pool=bogus")
    assert bad_value.returncode == 2 and "config error: eval.pool: Input should be 'avg' or 'cls'" in bad_value.stderr
    other_section = cli("eval", str(trained_fmnist), "--run.steps=3")
    assert other_section.returncode == 2 and "only takes --eval.* overrides" in other_section.stderr
    cls = cli("eval", str(trained_fmnist), "--eval.pool=cls", "--eval.probe_c=[0.1]")
    assert cls.returncode == 0, cls.stderr
    assert [row["name"] for row in json.loads((trained_fmnist / "eval.json").read_text())["rows"]][-1] == "depth 4"


def test_eval_untrained_row_probes_the_initial_weights(trained_fmnist):
    proc = cli("eval", str(trained_fmnist), "--eval.untrained=true", "--eval.probe_c=[0.1]")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((trained_fmnist / "eval.json").read_text())
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["raw pixels", "untrained, depth 4", "depth 1", "depth 2", "depth 3",
                                         "depth 4"]
    assert rows[1]["layers"] == rows[-1]["layers"]
    # the row's kNN, recomputed from a backbone of freshly seeded units: the weights before the first step (a test
    # in test_benchmarks.py checks that a run starts from exactly these)
    cfg = run_config(trained_fmnist)
    init = Backbone(cfg, initial_units(cfg)).eval()
    trained = Backbone(cfg, load_units(cfg, trained_fmnist)[0]).eval()
    split = {s: labelled_split(cfg, s, result[f"{s}_images"]) for s in ("train", "test")}
    feats = {s: depth_features(init, split[s][0], batch=cfg.eval.batch_size, pool="avg")[-1] for s in split}
    assert rows[1]["knn"] == knn(feats["train"], split["train"][1], feats["test"], split["test"][1], k=cfg.eval.knn_k)
    moved = depth_features(trained, split["test"][0], batch=cfg.eval.batch_size, pool="avg")[-1]
    assert not torch.allclose(moved, feats["test"])  # the trained features are others, so the check can fail


@pytest.fixture(scope="module")
def exports(trained_fmnist, tmp_path_factory) -> Path:
    """``bimdist export --depth k`` for k = 1..4, from one process whose umask is 022."""
    out = tmp_path_factory.mktemp("exports")
    calls = "; ".join(f"codes.append(main(['export', {str(trained_fmnist)!r}, '--depth', '{d}', '--out', "
                      f"{str(out / f'd{d}.safetensors')!r}]))" for d in (1, 2, 3, 4))
    proc = subprocess.run([sys.executable, "-c", "import os, sys; os.umask(0o022); from bimdist.cli import main; "
                           f"codes = []; {calls}; sys.exit(max(codes))"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_export_loads_strictly_into_timm_and_matches(trained_fmnist, exports, depth):
    out = exports / f"d{depth}.safetensors"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # the umask's mode, readable by the cluster's other users
    kwargs = json.loads(out.with_suffix(".json").read_text())
    model = VisionTransformer(**kwargs).eval()
    model.load_state_dict(load_file(str(out)), strict=True)
    cfg = load_config(str(trained_fmnist / "config.yaml"))
    units, _ = load_units(cfg, trained_fmnist)
    backbone = Backbone(cfg, units).eval()
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        theirs = model.forward_features(normalize_images(images, backbone.mean, backbone.std))
    assert torch.allclose(theirs, backbone.features(images, depths=depth)[-1], atol=1e-5)
    # What `bimdist eval` probes at this depth is timm's pooled output of the export, on real test images.
    real, _ = labelled_split(cfg, "test", 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(normalize_images(real, backbone.mean, backbone.std)),
                                    pre_logits=True)
    probed = depth_features(backbone, real, batch=16, pool="avg")[depth - 1]
    assert pooled.shape == probed.shape == (64, kwargs["embed_dim"])
    assert torch.allclose(pooled, probed, atol=1e-5)


def test_eval_linear_probe_agrees_with_an_independent_probe_of_the_export(trained_fmnist, tmp_path):
    """scikit-learn by hand on the exported timm model's pooled features, with the C the eval chose, scores within
    1 point of the eval's full-depth row: the table describes the model users download."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    proc = cli("eval", str(trained_fmnist))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((trained_fmnist / "eval.json").read_text())
    row = result["rows"][-1]
    out = tmp_path / "full.safetensors"
    assert cli("export", str(trained_fmnist), "--depth", "4", "--out", str(out)).returncode == 0
    model = VisionTransformer(**json.loads(out.with_suffix(".json").read_text())).eval()
    model.load_state_dict(load_file(str(out)), strict=True)
    cfg = load_config(str(trained_fmnist / "config.yaml"))
    mean, std = torch.tensor(cfg.data.mean).view(-1, 1, 1), torch.tensor(cfg.data.std).view(-1, 1, 1)

    def pooled(split: str, n: int) -> tuple:
        images, labels = labelled_split(cfg, split, n)
        with torch.no_grad():
            feats = model.forward_head(model.forward_features(normalize_images(images, mean, std)), pre_logits=True)
        return feats.numpy(), labels.numpy()

    xtr, ytr = pooled("train", result["train_images"])
    xte, yte = pooled("test", result["test_images"])
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=row["c"], max_iter=5000, tol=1e-6)).fit(xtr, ytr)
    theirs = 100.0 * probe.score(xte, yte)
    assert abs(theirs - row["linear"]) <= 1.0, (theirs, row)


def test_export_rejects_a_bad_depth(trained_fmnist, tmp_path):
    proc = cli("export", str(trained_fmnist), "--depth", "9", "--out", str(tmp_path / "x.safetensors"))
    assert proc.returncode == 2 and "depth 9 is out of range" in proc.stderr


def test_recon_on_demand(trained_fmnist, tmp_path):
    proc = cli("recon", str(trained_fmnist), "--out", str(tmp_path / "r.png"))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "r.png").format == "PNG"


def test_fmnist_mini_asset_is_real_fashion_mnist():
    info = json.loads((FMNIST_MINI / "dataset.json").read_text())
    assert info["name"] == "fashion-mnist" and info["num_train"] == 256


def test_missing_test_shards_stop_the_run_before_training_naming_the_key(run_dir, tmp_path):
    """They used to fail only at the end, while recon.png was drawn, with a message naming data.train_shards."""
    missing = f"{tmp_path}/nothing-{{000000..000001}}.tar"
    proc = cli("train", str(TINY), "--data.source=shards", *fmnist_mini_args(), f"--data.test_shards={missing}",
               "--model.img_size=28", f"--run.dir={run_dir}", "--run.steps=5", "--run.recon_png=true", timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert f"data.test_shards={missing!r}: 2 of 2 shards are missing" in proc.stderr
    assert "set data.test_shards=null" in proc.stderr and "progress" not in proc.stderr
    assert not (run_dir / "checkpoints").exists()


def test_without_test_shards_recon_png_shows_training_images(run_dir):
    train = fmnist_mini_args()[0]
    proc = cli("train", str(TINY), "--data.source=shards", train, "--data.test_shards=null", "--model.img_size=28",
               f"--run.dir={run_dir}", "--run.steps=4", "--run.recon_png=true", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / "recon.png").stat().st_size > 0
