"""Every benchmark script runs end to end with --quick (tiny sizes), so none of them can rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bimdist.config import EvalConfig
from tests.conftest import ROOT


def bench(name: str, tmp_path: Path, *extra: str, timeout: float = 600) -> dict:
    readmes = {p: p.read_text() for p in (ROOT / "README.md", ROOT / "benchmarks" / "README.md")}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(p.read_text() == text for p, text in readmes.items()), "--quick must not rewrite a README"
    files = list(tmp_path.glob("*_quick.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists()
    record = json.loads(files[0].read_text())
    assert record["machine"]["cores"] >= 1 and record["machine"]["torch"]
    return record


def test_flops_quick(tmp_path):
    (v,) = bench("flops", tmp_path)["variants"]
    assert v["bim"] > 0 and v["mae"] > 0 and v["bim_incremental"] < v["bim"]
    assert len(v["separate_mae_per_depth"]) == v["blocks"]
    assert v["separate_mae_per_depth"] == sorted(v["separate_mae_per_depth"])  # deeper MAEs cost more
    assert 0 < v["once_for_all_saving"] < 1


def test_memory_quick(tmp_path):
    (r,) = bench("memory", tmp_path)["results"]
    assert r["mae"]["peak_bytes"] > 0 and r["bim_sequential"]["peak_bytes"] > 0
    assert r["bim_sequential"]["saved_bytes"] < r["mae"]["saved_bytes"]  # one block's graph at a time
    # live tensors: at least what autograd saves, and BIM's blocks hold less at once than MAE
    for run in (r["mae"], r["bim_sequential"], *r["pipelines"]["2"]):
        assert run["live_bytes"] > run["saved_bytes"]
    assert r["bim_sequential"]["live_bytes"] < r["mae"]["live_bytes"]
    assert [s["stage"] for s in r["pipelines"]["2"]] == [0, 1]
    c = r["chunked"]  # decoders over slices: less kept for backward, one more decoder forward
    assert c["bim_sequential"]["saved_bytes"] < r["bim_sequential"]["saved_bytes"]
    assert c["mae"]["saved_bytes"] < r["mae"]["saved_bytes"]
    assert r["chunked_flop_overhead"]["bim"] > 0 and r["chunked_flop_overhead"]["mae"] > 0


def test_throughput_quick(tmp_path):
    r = bench("throughput", tmp_path, "--device", "cpu")  # the CPU path, also where a GPU is visible
    assert set(r["median_samples_per_s"]) >= {"(a) MAE, 1 process", "(b) BIM sequential, 1 process"}
    assert all(v > 0 for v in r["median_samples_per_s"].values())
    assert any(k.startswith("(d)") for k in r["median_samples_per_s"])
    assert any(k.startswith("(e)") for k in r["median_samples_per_s"])
    assert len(r["isolated_stage_step_s"]) == 2 and r["efficiency"] > 0
    assert len(r["isolated_together_stage_step_s"]) == 2 and r["efficiency_together"] > 0
    # the bound is measured in every round (--quick runs one), and the efficiency is that round's
    rounds = len(r["rounds"]["(a) MAE, 1 process"])
    assert len(r["isolated_stage_step_s_by_round"]) == len(r["isolated_together_stage_step_s_by_round"]) == rounds
    assert all(len(ts) == 2 for ts in r["isolated_stage_step_s_by_round"])
    assert r["efficiency_by_round"] == [r["efficiency"]] * rounds
    assert set(r["idle_fraction"]) == {"0", "1"} or set(r["idle_fraction"]) == {0, 1}
    # achieved FLOP/s: the benchmark's own count of each model agrees with what the trainer's stages counted
    assert r["device"] == "cpu"
    for runs in r["rounds"].values():
        run = runs[0]
        assert run["tflop_per_s"] == pytest.approx(run["samples_per_s"] * run["flop_per_sample"] / 1e12)
        if "step_flop" in run:  # a bimdist run: every stage's flop counter
            assert sum(run["step_flop"].values()) / r["batch"] == pytest.approx(run["flop_per_sample"], rel=1e-3)
    mae = r["flop_per_sample"]["(a) MAE, 1 process"]
    assert all(r["flop_per_sample"][n] == mae for n in r["rounds"] if n[:3] in ("(d)", "(e)"))
    assert r["flop_per_sample"]["(b) BIM sequential, 1 process"] > mae  # BIM adds a decoder per block


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("cmd", [["bimdist.baselines.torch_pipe", str(ROOT / "tests/assets/tiny.yaml")],
                                 ["bimdist.baselines.ds_pipe", str(ROOT / "tests/assets/tiny.yaml")],
                                 ["benchmarks.throughput", "--quick"]])
def test_cuda_wanted_without_gpu_is_refused(cmd):
    """Asked for CUDA where none is visible, the baselines and the benchmark stop at once and say what to do."""
    extra = ["--device", "cuda"] if cmd[0] == "benchmarks.throughput" else ["--pipeline.device=cuda"]
    proc = subprocess.run([sys.executable, "-m", *cmd, *extra], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode != 0
    assert "no CUDA device is visible; use pipeline.device=cpu" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_quick(tmp_path):
    r = bench("data", tmp_path)
    med = r["median_samples_per_s"]
    assert {"decode-simplejpeg", "legacy", "w0", "w0-nodraft", "w1", "w2", "w0-max256"} <= set(med)
    assert all(v > 0 for v in med.values())
    assert r["bytes_per_image"]["max256"] < r["bytes_per_image"]["plain"]
    assert r["cores_to_feed"] > 0 and len(r["checks"]) >= 4
    assert 0 < r["cores_busy"]["w0"] <= 1.5
    # where the decoding ran (not how fast: the other test process may hold the second core): in the rank itself
    # with workers=0, in worker processes with workers=2
    assert r["worker_cpu_s"]["w0"] == 0 and r["worker_cpu_s"]["w2"] > 0


def test_doctor_quick(tmp_path):
    r = bench("doctor", tmp_path)
    checks = dict(r["doctor"]["rows"])
    assert {"versions", "cpu", "rank device and backend", "training shards", "stage 0 data", "stage step times",
            "predicted pipeline rate"} <= set(checks)
    assert r["predicted_samples_per_s"] > 0 and r["measured_samples_per_s"] > 0
    assert r["doctor"]["figures"]["limited_by"] in {"compute", "link", "data"}


def test_stages_quick(tmp_path):
    r = bench("stages", tmp_path)
    assert [s["stage"] for s in r["stages"]] == [0, 1]
    assert all(s["samples_per_s"] > 0 and s["step_flop"] > 0 for s in r["stages"])


def test_recovery_quick(tmp_path):
    r = bench("recovery", tmp_path)
    assert r["one_kill"]["exit_code"] == 0 and r["three_kills"]["exit_code"] == 0
    assert r["exact_one"] and r["exact_three"]
    assert [e["stage"] for e in r["three_kills"]["events"]] == [2, 0, 3]
    assert all(e["others_kept"] for e in r["three_kills"]["events"] + r["one_kill"]["events"])
    assert r["one_kill"]["only_the_killed_restarted"] and r["three_kills"]["only_the_killed_restarted"]
    d = r["defaults_kill"]
    assert d["exit_code"] == 0 and r["exact_defaults"] and d["only_the_killed_restarted"]
    assert d["events"][0]["resumed_at"] == 0  # no checkpoint yet at the shipped cadence: from the run's start


def test_model_quick(tmp_path):
    r = bench("model", tmp_path)
    points = r["predictions"]["ViT-B/16"]["points"]
    assert points and all(p["samples_per_s"] > 0 for p in points)
    assert {p["limited_by"] for p in points} <= {"compute", "activation link", "gradient all-reduce"}
    for p in r["data_path"]:  # from the newest data benchmark in benchmarks/results, when there is one
        assert p["limited_by"] in {"compute", "data"} and p["data_samples_per_s"] > 0
    slow = [p for p in points if p["link"].startswith("Ethernet") and p["replicas"] == 1][0]
    fast = [p for p in points if p["link"].startswith("NVLink") and p["replicas"] == 1][0]
    assert slow["samples_per_s"] <= fast["samples_per_s"]
    assert r["cpu_check"]["gloo_bytes_per_s"] > 0


@pytest.mark.timeout(900)
def test_accuracy_quick(tmp_path):
    r = bench("accuracy", tmp_path, timeout=900)
    assert set(r["runs"]) == {"BIM", "MAE"}
    for run in r["runs"].values():
        names = [row["name"] for row in run["rows"]]
        assert names[0] == "raw pixels" and names[1] == "depth 1" and run["train_images"] == 256
        assert all(0 <= row["linear"] <= 100 and not math.isnan(row["knn"]) for row in run["rows"])
        assert all(row["c"] in EvalConfig().probe_c for row in run["rows"])  # the probe chose C from the grid
    assert len(r["checks"]) == 2 and all(isinstance(c["met"], bool) for c in r["checks"])


@pytest.mark.timeout(900)
def test_accuracy_ablation_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--ablate", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("accuracy-ablation_*_quick.json")
    variants = json.loads(path.read_text())["variants"]
    assert set(variants) == {"model 128 wide, 4 layers (same compute)"}
    # the quick preset is 64 wide and runs 4 steps: the 128-wide variant costs more per step, so it gets fewer
    (variant,) = variants.values()
    assert 0 < variant["steps"] < 4 and variant["rows"][0]["name"] == "raw pixels"


def test_ablation_control_keeps_the_initial_weights(tmp_path):
    """The "no pretraining" row probes the initial weights: its one step at base lr 1e-12 changes no weight."""
    from benchmarks.accuracy import NO_PRETRAINING, QUICK, ablation_args
    from bimdist.config import load_config
    from bimdist.model.unit import build_unit
    from tests.conftest import cli, load_block

    preset = load_config("fmnist-tiny", QUICK)
    over, steps = ablation_args(NO_PRETRAINING, QUICK, 234, preset)
    assert steps == 1
    proc = cli("train", "fmnist-tiny", *QUICK, f"--run.steps={steps}", *over, f"--run.dir={tmp_path}",
               "--run.recon_png=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config("fmnist-tiny", [*QUICK, f"--run.steps={steps}", *over])
    for block in range(cfg.model.blocks):
        init = build_unit(cfg, block).state_dict()
        saved = load_block(tmp_path, 1, block)
        assert saved.keys() == init.keys()
        assert all(torch.equal(saved[k], init[k]) for k in init), f"block {block} moved"
    # another seed's initialisation differs from the saved weights, so the check above can fail
    other = build_unit(load_config("fmnist-tiny", [*QUICK, "--run.seed=1"]), 0).state_dict()
    assert not all(torch.equal(load_block(tmp_path, 1, 0)[k], v) for k, v in other.items())


def test_finetune_quick(tmp_path):
    r = bench("finetune", tmp_path, "--jobs", "2")
    arms = {(x["arm"], x["depth"], x["labels"]) for x in r["runs"]}
    assert arms == {(a, d, f) for a in ("BIM", "MAE", "from scratch") for d in (4, 1) for f in (1.0, 0.5)}
    assert len(r["runs"]) == len(arms)  # --quick: one seed
    assert all(0 <= x["top1"] <= 100 for x in r["runs"])
    half = {x["train_labels_sha256"] for x in r["runs"] if x["labels"] == 0.5}
    assert len(half) == 1  # the same label subset for every arm, depth and seed
    assert {c["target"] for c in r["checks"]} >= {"full depth, all labels: BIM top-1 %"}


def test_layout_quick(tmp_path):
    r = bench("layout", tmp_path)
    rates = r["median_samples_per_s"]
    assert set(rates) == {"[1, 1]", "[2, 1]"} and all(v > 0 for v in rates.values())
    assert {int(k): v for k, v in r["rounds"]["[2, 1]"][0]["replicas"].items()} == {0: 2, 1: 1}  # JSON keys are text
    # stage 0 decodes 0.55-megapixel JPEGs in full: far more than 10 us of CPU a sample, and more than stage 1
    assert r["stage0_cpu_s_per_sample"] > r["stage1_cpu_s_per_sample"] > 1e-5
    # two cores cannot give more CPU time than they have, so the bound (2 cores over what [1, 1] used) is at least
    # ~1 (no upper limit: on a busy machine [1, 1] gets less than its cores and the bound grows)
    assert r["bound"] >= 0.9
    assert r["doctor_layout"]["counts"] == [2, 1]  # the doctor gives the third device to the decoding stage


def test_network_quick(tmp_path):
    from tests.integration.netns import available

    why = available()
    if why is not None:
        pytest.skip(f"namespaced nodes: {why}")
    r = bench("network", tmp_path)
    rate = r["rate_mbit"] * 1e6 / 8
    assert 0.5 * rate < r["probe"]["bytes_per_s"] <= 1.05 * rate  # the probe sees the throttled link, not loopback
    fp32, bf16 = r["runs"]["fp32"], r["runs"]["bf16"]
    assert fp32["limited_by"] == bf16["limited_by"] == "link" and "wire_dtype=bf16" in fp32["doctor_link_bound"]
    assert fp32["message_bytes"] > 1.8 * bf16["message_bytes"]
    assert fp32["samples_per_s"] > 0 and bf16["samples_per_s"] > 0
