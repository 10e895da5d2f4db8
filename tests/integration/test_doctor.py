"""``bimdist doctor``: what a job needs and this node lacks is exit 2 with one line naming it and the fix."""

import socket

from tests.conftest import FMNIST_MINI, TINY, cli

MINI = f"--data.train_shards={FMNIST_MINI}/train-{{000000..000003}}.tar"


def test_missing_shards_exit_2_naming_the_pattern(tmp_path):
    pattern = f"{tmp_path}/nothing-{{000000..000003}}.tar"
    proc = cli("doctor", "fmnist-tiny", f"--data.train_shards={pattern}", timeout=120)
    assert proc.returncode == 2
    assert f"data.train_shards={pattern!r}" in proc.stderr and "4 of 4 shards are missing" in proc.stderr


def test_a_taken_metrics_port_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = cli("doctor", "fmnist-tiny", MINI, f"--metrics.port={port}", timeout=120)
    assert proc.returncode == 2 and f"metrics port {port} on 127.0.0.1 is taken" in proc.stderr


def test_too_little_shared_memory_for_the_data_workers_is_named():
    proc = cli("doctor", "vit-base-16", MINI, "--data.workers=100000", "--pipeline.stages=1", timeout=120)
    assert proc.returncode == 2
    assert "/dev/shm has" in proc.stderr and "100000 data workers need" in proc.stderr and "--shm-size" in proc.stderr


def test_devices_chooses_a_replica_count_per_stage():
    proc = cli("doctor", str(TINY), "--pipeline.stages=2", "--devices", "4", timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("layout for 4 devices"))
    assert "samples/s predicted, limited by stage" in line
    counts = [int(c) for c in line.split("replicas [")[1].split("]")[0].split(", ")]
    assert sum(counts) == 4 and len(counts) == 2
    assert any(ln.strip().startswith("equal counts") and "replicas [2, 2]" in ln for ln in proc.stdout.splitlines())


def test_a_slow_link_given_makes_the_job_link_bound_and_names_the_bf16_wire(tmp_path):
    import json

    proc = cli("doctor", str(TINY), "--pipeline.stages=2", "--link-gbps", "0.0001", "--json",
               str(tmp_path / "d.json"), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads((tmp_path / "d.json").read_text())["figures"]
    assert figures["limited_by"] == "link" and figures["link_bytes_per_s"] == 0.0001e9 / 8
    assert figures["samples_per_s"] == figures["rates"]["link"] < min(v for k, v in figures["rates"].items()
                                                                     if k != "link")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("link-bound"))
    assert "pipeline.wire_dtype=bf16 sends" in line and "Gbit/s would not hold it back" in line
    bad = cli("doctor", str(TINY), "--pipeline.stages=2", "--link-gbps", "0", timeout=60)
    assert bad.returncode == 2 and "--link-gbps=0" in bad.stderr
