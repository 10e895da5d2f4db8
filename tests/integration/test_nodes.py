"""Multi-node runs where each node has its own network stack: network namespaces joined through a bridge (root
only; skipped with the reason elsewhere). The shipped torchrun script starts each node, c10d rendezvous at node 0's
address; stages 0-1 run on node 0, stages 2-3 on node 1, so the activation stream crosses the link. Listeners bind
where the config says, Prometheus scrapes every rank at its node's address, and a cut link is survived (20 s) or
ends every rank in time, with a resume that is exact."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from bimdist.distributed.launch import free_port
from tests.conftest import ROOT, TINY, alive, cli, same_weights, wait_for
from tests.integration.netns import Nodes, available

STEPS = 1200
RUN = [str(TINY), f"--run.steps={STEPS}", "--pipeline.stages=4", "--run.log_every=100", "--checkpoint.every=200",
       "--pipeline.peer_timeout_s=30"]
WHY = available()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"namespaced nodes: {WHY}")


@pytest.fixture(scope="module")
def nodes():
    n = Nodes(2).up()
    try:
        yield n
    finally:
        n.down()
        assert n.leftovers() == [], f"left behind: {n.leftovers()}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run on one node (4 local ranks, one thread each, as each node's two ranks get)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = cli("train", *RUN, "--pipeline.threads=1", f"--run.dir={run_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def env_for(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "GLOO_SOCKET_IFNAME")}
    return {**env, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **extra}


def start_job(nodes: Nodes, run_dir: Path, logs: Path, *extra: str, port: int) -> list[subprocess.Popen]:
    """``launch/torchrun/multi_node.sh`` on each node: 2 ranks a node, c10d rendezvous at node 0."""
    procs = []
    for i in range(2):
        env = env_for({"NNODES": "2", "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": f"{nodes.addresses[0]}:{port}",
                       "RDZV_ID": f"ns{port}", "NODE_RANK": str(i), "LOCAL_ADDR": nodes.addresses[i],
                       "MAX_RESTARTS": "0", **({"RDZV_CONF": "is_host=1"} if i == 0 else {})})
        procs.append(nodes.popen(i, ["bash", str(ROOT / "launch" / "torchrun" / "multi_node.sh"), *RUN,
                                     f"--run.dir={run_dir}", *extra], log=logs / f"node{i}.log", env=env, cwd=ROOT))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait(timeout=30)
    return codes


def ranks_in(nodes: Nodes) -> list[int]:
    """Every process running bimdist in a node's namespace."""
    pids = []
    for ns in nodes.names:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        pids += [int(p) for p in out if alive(int(p)) and b"bimdist" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return pids


def text(logs: Path) -> str:
    return "".join((logs / f"node{i}.log").read_text() for i in range(2) if (logs / f"node{i}.log").exists())


def prometheus(tmp: Path, sd: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": "bimdist", "file_sd_configs": [{"files": [str(sd / "*.json")], "refresh_interval": "1s"}]}]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    binary = subprocess.run(["which", "prometheus"], capture_output=True, text=True).stdout.strip()
    if not binary:
        pytest.fail("prometheus is not installed; run launch/setup.sh")
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def up_targets(url: str, job: str) -> dict[str, str]:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?query=up%7Bjob%3D%22{job}%22%7D", timeout=5) as r:
            result = json.loads(r.read())["data"]["result"]
    except OSError:
        return {}
    return {s["metric"]["instance"]: s["value"][1] for s in result}


def test_two_nodes_train_exactly_across_a_link_scraped_at_their_addresses_and_survive_a_20_s_cut(
        nodes, reference, tmp_path):
    """Prometheus (in this namespace) scrapes all four ranks at their nodes' addresses through file_sd, while the
    link of node 1 (stages 2 and 3) goes down for 20 s; the run goes on and ends with the one-node run's weights."""
    sd = tmp_path / "sd"
    prom, url = prometheus(tmp_path, sd)
    metrics_port = free_port()
    procs = start_job(nodes, tmp_path / "run", tmp_path, f"--metrics.port={metrics_port}", "--metrics.bind=0.0.0.0",
                      f"--metrics.file_sd_dir={sd}", "--metrics.job=ns", port=free_port())
    try:
        want = {f"{a}:{metrics_port + r}": "1" for a in nodes.addresses for r in (0, 1)}
        assert wait_for(lambda: up_targets(url, "ns") == want, 90), (up_targets(url, "ns"), text(tmp_path)[-3000:])
        files = sorted(p.name for p in sd.glob("*.json"))
        assert len(files) == 2 and all(any(a in f for f in files) for a in nodes.addresses)  # one file per node
        assert wait_for(lambda: "progress stage=3 replica=0 step=300/" in text(tmp_path), 120), text(tmp_path)[-3000:]
        nodes.cut(1)
        time.sleep(20)
        nodes.mend(1)
        codes = finish(procs, 240)
    finally:
        finish(procs, 5)
        prom.terminate()
        prom.wait(timeout=30)
    log = text(tmp_path)
    assert codes == [0, 0], log[-3000:]
    assert log.count(f"finished at step {STEPS} (step limit)") == 4
    assert same_weights(reference, tmp_path / "run", STEPS), "the two-node run's weights differ from one node's"
    assert not ranks_in(nodes)


def test_loopback_listeners_cannot_be_reached_from_another_node_and_bound_ones_can(nodes, tmp_path):
    """A standalone job on node 0: its job store listens on loopback only, and so do its metrics with
    metrics.bind=127.0.0.1; with metrics.bind set to the node's address, node 1 reads them."""
    env = env_for({})

    def reach(address: str, port: int) -> str:
        code = (f"import socket,sys\ntry:\n    socket.create_connection(('{address}', {port}), timeout=3).close()\n"
                "    print('open')\nexcept OSError as e:\n    print(type(e).__name__)")
        return subprocess.run(nodes.cmd(1, [sys.executable, "-c", code]), capture_output=True, text=True,
                              timeout=30).stdout.strip()

    for bind, reachable in (("127.0.0.1", False), (nodes.addresses[0], True)):
        port = free_port()
        log = tmp_path / f"{bind}.log"
        job = nodes.popen(0, [sys.executable, "-m", "bimdist", "train", str(TINY), "--pipeline.stages=2",
                              "--run.steps=100000", f"--run.dir={tmp_path / bind}", f"--metrics.port={port}",
                              f"--metrics.bind={bind}"], log=log, env=env, cwd=ROOT)
        try:
            assert wait_for(lambda lg=log: "progress stage=1" in lg.read_text(), 120), log.read_text()[-3000:]
            store_port = int(re.search(r"job store on 127.0.0.1:(\d+) \(loopback only\)", log.read_text()).group(1))
            assert reach(nodes.addresses[0], store_port) == "ConnectionRefusedError"
            got = reach(nodes.addresses[0], port)
            assert got == ("open" if reachable else "ConnectionRefusedError"), (bind, got)
            if reachable:
                out = subprocess.run(nodes.cmd(1, [sys.executable, "-c", "import urllib.request; print(urllib.request."
                                                   f"urlopen('http://{bind}:{port}/metrics', timeout=5).read()"
                                                   ".decode().count('bimdist_steps_total'))"]),
                                     capture_output=True, text=True, timeout=30).stdout.strip()
                assert int(out) > 0
        finally:
            os.killpg(job.pid, 15)
            job.wait(timeout=60)
    assert not ranks_in(nodes)


def test_a_cut_that_stays_ends_every_rank_naming_the_node_and_the_resume_is_exact(nodes, reference, tmp_path):
    logs = tmp_path / "first"
    logs.mkdir()
    procs = start_job(nodes, tmp_path / "run", logs, port=free_port())
    try:
        saved = [f"checkpoint stage={s} replica=0 step=200 " for s in range(4)]
        assert wait_for(lambda: all(m in text(logs) for m in saved), 120), text(logs)[-3000:]
        ranks = ranks_in(nodes)
        nodes.cut(1)
        cut_at = time.monotonic()
        # the ranks, not the torchrun agents: an agent cut off from its rendezvous store waits in torchrun's own
        # store calls until it is killed (as Slurm does; here finish() below)
        assert wait_for(lambda: not [p for p in ranks if alive(p) and _is_rank(p)], 30 + 15 + 10), \
            "ranks outlived the cut"
        ended = time.monotonic() - cut_at
    finally:
        finish(procs, 5)
        nodes.mend(1)
    log = text(logs)
    assert ended <= 30 + 15, f"the ranks took {ended:.0f} s to end"
    assert re.search(rf"stage [12] \(rank [12]\) on {re.escape(nodes.addresses[1])}|"
                     rf"stage [12] \(rank [12]\) on {re.escape(nodes.addresses[0])}", log), log[-3000:]
    from bimdist.runs import run_config, store_for

    store = store_for(run_config(tmp_path / "run"), tmp_path / "run")
    newest = store.latest()
    assert newest is not None and newest >= 200 and store.verify(newest) is None  # the newest checkpoint is intact
    logs = tmp_path / "again"
    logs.mkdir()
    procs = start_job(nodes, tmp_path / "run", logs, port=free_port())
    codes = finish(procs, 240)
    assert codes == [0, 0], text(logs)[-3000:]
    assert f"(step {newest})" in text(logs)
    assert same_weights(reference, tmp_path / "run", STEPS), "the resumed run's weights differ"
    assert not ranks_in(nodes)


def _is_rank(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"bimdist\x00train" in cmd and b"torch.distributed.run" not in cmd


def test_the_fixture_leaves_nothing_behind():
    n = Nodes(2).up()
    try:
        assert not n.leftovers() or set(n.leftovers()) == {*n.names, *n.host_ends, n.bridge}
        with socket.socket() as s:  # this namespace reaches a node through the bridge (refused: nothing listens)
            s.settimeout(3)
            assert s.connect_ex((n.addresses[0], 9)) != 0
    finally:
        n.down()
    assert n.leftovers() == []
