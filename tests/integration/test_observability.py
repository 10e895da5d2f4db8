"""Observability against real servers: Prometheus scraping a live 4-stage run, every dashboard and alert
expression evaluated on it, the Pushgateway receiving outcomes, the deploy files validated by their tools,
and the merged pipeline timeline."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from bimdist.distributed.launch import free_port
from tests.conftest import ROOT, TINY, cli, start_cli, wait_for

DEPLOY = ROOT / "deploy"
JOB = "bimdist-test"
METRICS = ["bimdist_steps_total", "bimdist_samples_total", "bimdist_loss", "bimdist_step_duration_seconds_count",
           "bimdist_compute_seconds_total", "bimdist_recv_wait_seconds_total", "bimdist_send_wait_seconds_total",
           "bimdist_sent_bytes_total", "bimdist_received_bytes_total", "bimdist_messages_in_flight",
           "bimdist_learning_rate", "bimdist_last_step_timestamp_seconds", "bimdist_nonfinite_losses_total",
           "bimdist_corrupt_samples_total", "bimdist_peak_memory_bytes", "bimdist_build_info", "bimdist_step",
           "bimdist_data_wait_seconds_total", "bimdist_stage_restarts_total", "bimdist_replayed_steps_total",
           "bimdist_replay_log_bytes", "bimdist_grad_norm", "bimdist_next_stage_restartable",
           "bimdist_monitor_knn_top1", "bimdist_busy_seconds_total", "bimdist_stage_replicas"]


def need(binary: str) -> str:
    path = subprocess.run(["which", binary], capture_output=True, text=True).stdout.strip()
    if not path:
        pytest.fail(f"{binary} is not installed; run launch/setup.sh (Debian package prometheus / pushgateway)")
    return path


def free_block(n: int) -> int:
    """A base port with n free consecutive ports."""
    for _ in range(50):
        base = free_port()
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no block of free ports")


def query(prom: str, expr: str) -> dict:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def series(prom: str, expr: str) -> list[dict]:
    out = query(prom, expr)
    assert out["status"] == "success", out
    return out["data"]["result"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obs")
    pg_port, prom_port, metrics_port = free_port(), free_port(), free_block(4)
    procs = []
    pg = subprocess.Popen([need("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{pg_port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(pg)
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    jobs["bimdist"]["file_sd_configs"][0].update(files=[str(tmp / "sd" / "*.json")], refresh_interval="1s")
    jobs["pushgateway"]["static_configs"][0]["targets"] = [f"127.0.0.1:{pg_port}"]
    config["scrape_configs"] = [jobs["bimdist"], jobs["pushgateway"]]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen([need("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(prom)
    url = f"http://127.0.0.1:{prom_port}"
    log = tmp / "train.log"
    job = start_cli("train", str(TINY), f"--run.dir={tmp / 'run'}", "--run.steps=1000000", "--pipeline.stages=4",
                    f"--metrics.port={metrics_port}", f"--metrics.file_sd_dir={tmp / 'sd'}", f"--metrics.job={JOB}",
                    f"--metrics.pushgateway=127.0.0.1:{pg_port}", "--metrics.trace=true", "--run.log_every=200",
                    "--eval.monitor_every=50", "--eval.monitor_samples=100",
                    log_path=log)
    procs.append(job)
    # a fine-tuning job next to it (from scratch: it needs only the run's config.yaml), for the dashboard's row
    fport = free_block(1)
    assert wait_for(lambda: (tmp / "run" / "config.yaml").exists(), 60)
    ft = start_cli("finetune", str(tmp / "run"), "--depth", "4", "--finetune.init=scratch",
                   "--finetune.epochs=100000", "--finetune.batch_size=32", "--finetune.eval_every=4",
                   "--finetune.eval_samples=64", f"--metrics.port={fport}", f"--metrics.file_sd_dir={tmp / 'sd'}",
                   f"--metrics.job={JOB}-finetune", f"--finetune.dir={tmp / 'ft'}", log_path=tmp / "finetune.log")
    procs.append(ft)
    try:
        def scraped() -> bool:
            try:
                res = series(url, f'rate(bimdist_steps_total{{job="{JOB}"}}[5s]) > 0')
                return len(res) == 4
            except OSError:
                return False

        assert wait_for(scraped, 150), log.read_text()[-3000:]

        def finetune_scraped() -> bool:
            try:
                return bool(series(url, f'bimdist_finetune_eval_top1{{job="{JOB}-finetune"}} >= 0'))
            except OSError:
                return False

        assert wait_for(finetune_scraped, 150), (tmp / "finetune.log").read_text()[-3000:]
        time.sleep(3)  # a few more scrapes, so every rate() window has data
        yield {"prom": url, "pushgateway": f"http://127.0.0.1:{pg_port}", "job": job, "run": tmp / "run",
               "sd": tmp / "sd", "log": log}
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def test_prometheus_scrapes_every_metric_for_every_stage(stack):
    for name in METRICS:
        got = series(stack["prom"], f'{name}{{job="{JOB}"}}')
        assert sorted(s["metric"]["stage"] for s in got) == ["0", "1", "2", "3"], name
        assert {s["metric"]["replica"] for s in got} == {"0"}
    def steps() -> dict[str, float]:
        return {s["metric"]["stage"]: float(s["value"][1]) for s in series(stack["prom"], "bimdist_steps_total")}

    steps1 = steps()
    assert all(v > 0 for v in steps1.values()), steps1

    def advanced() -> bool:  # every stage's counter moves on (a loaded machine scrapes a slow stage late)
        now = steps()
        return all(now.get(k, 0) > v for k, v in steps1.items())
    assert wait_for(advanced, 60, interval=1.0), steps1
    for s in series(stack["prom"], "bimdist_loss"):
        assert math.isfinite(float(s["value"][1])) and 0 < float(s["value"][1]) < 100
    sent = {s["metric"]["stage"]: float(s["value"][1]) for s in series(stack["prom"], "bimdist_sent_bytes_total")}
    assert sent["0"] > 0 and sent["1"] > 0 and sent["2"] > 0 and sent["3"] == 0  # the last stage sends nothing
    assert all(float(s["value"][1]) > 0 for s in series(stack["prom"], "bimdist_peak_memory_bytes"))
    info = series(stack["prom"], "bimdist_build_info")[0]["metric"]
    assert info["version"] and len(info["fingerprint"]) == 16


def test_prometheus_scrapes_the_finetuning_job(stack):
    for name in ("bimdist_finetune_steps_total", "bimdist_finetune_samples_total", "bimdist_finetune_loss",
                 "bimdist_finetune_learning_rate", "bimdist_finetune_eval_top1", "bimdist_finetune_eval_top5",
                 "bimdist_finetune_step", "bimdist_finetune_steps_target", "bimdist_build_info"):
        got = series(stack["prom"], f'{name}{{job="{JOB}-finetune"}}')
        labels = [(s["metric"]["rank"], s["metric"]["depth"], s["metric"]["init"]) for s in got]
        assert labels == [("0", "4", "scratch")], name
    top1 = float(series(stack["prom"], f'bimdist_finetune_eval_top1{{job="{JOB}-finetune"}}')[0]["value"][1])
    assert 0 <= top1 <= 100


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "bimdist.json").read_text())
    assert dash["uid"] == "bimdist-pipeline"
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]  # a row panel has none


def test_every_dashboard_panel_returns_data(stack):
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        concrete = expr.replace("$__rate_interval", "10s").replace("$job", ".*")
        assert series(stack["prom"], concrete), f"dead panel: {expr}"


def test_every_alert_rule_evaluates(stack):
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"BimdistRunStalled", "BimdistNonFiniteLoss", "BimdistTargetDown",
                                           "BimdistStageIdle", "BimdistDataBound", "BimdistStageRestarted",
                                           "BimdistStageCannotRestartAlone", "BimdistStragglerReplica"}
    for rule in rules:
        assert query(stack["prom"], rule["expr"])["status"] == "success", rule["alert"]
    with urllib.request.urlopen(stack["prom"] + "/api/v1/rules", timeout=10) as r:
        groups = json.loads(r.read())["data"]["groups"]
    assert {rule["health"] for g in groups for rule in g["rules"]} == {"ok"}
    # nothing is wrong with a healthy run: no alert may fire
    assert not [a for a in series(stack["prom"], "ALERTS") if a["metric"].get("alertstate") == "firing"]


def sd_files(folder: Path, job: str) -> list[Path]:
    """The file_sd target files of one job (the fine-tuning job advertises its own next to the pipeline's)."""
    return [f for f in folder.glob("*.json") if json.loads(f.read_text())[0]["labels"]["job"] == job]


def test_file_sd_target_is_advertised(stack):
    files = sd_files(stack["sd"], JOB)
    assert len(files) == 1 and len(sd_files(stack["sd"], f"{JOB}-finetune")) == 1
    targets = json.loads(files[0].read_text())[0]["targets"]
    assert len(targets) == 4
    up = series(stack["prom"], f'up{{job="{JOB}"}}')
    assert len(up) == 4 and all(s["value"][1] == "1" for s in up)


def test_sigterm_pushes_the_outcome_removes_the_target_and_leaves_a_trace(stack):
    job = stack["job"]
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 75, stack["log"].read_text()[-3000:]
    assert sd_files(stack["sd"], JOB) == []  # the target file is removed at exit
    with urllib.request.urlopen(stack["pushgateway"] + "/metrics", timeout=10) as r:
        pushed = r.read().decode()
    for stage in range(4):
        assert f'bimdist_last_exit_code{{instance="",job="{JOB}",replica="0",stage="{stage}"}} 75' in pushed
    proc = cli("trace", "merge", str(stack["run"]))
    assert proc.returncode == 0, proc.stderr
    trace = json.loads((stack["run"] / "trace.json").read_text())["traceEvents"]
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace if e["name"] == "thread_name"}
    assert sorted(tracks.values()) == ["stage 0", "stage 1", "stage 2", "stage 3"]
    for key in tracks:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e["ph"] == "X" and (e["pid"], e["tid"]) == key)
        assert len(spans) > 20
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), f"overlapping spans in {key}"
    names = {e["name"] for e in trace if e["ph"] == "X"}
    assert {"recv-wait", "compute", "send-wait", "decoder", "checkpoint"} <= names


def test_successful_run_pushes_a_success_timestamp(stack, tmp_path):
    gateway = stack["pushgateway"].removeprefix("http://")
    proc = cli("train", str(TINY), f"--run.dir={tmp_path}", "--run.steps=4", "--pipeline.stages=2",
               f"--metrics.pushgateway={gateway}", "--metrics.job=bimdist-push")
    assert proc.returncode == 0, proc.stderr
    with urllib.request.urlopen(stack["pushgateway"] + "/metrics", timeout=10) as r:
        pushed = r.read().decode()
    for stage in (0, 1):
        line = next(ln for ln in pushed.splitlines() if ln.startswith("bimdist_last_success_timestamp_seconds")
                    and 'job="bimdist-push"' in ln and f'stage="{stage}"' in ln)
        assert abs(float(line.split()[-1]) - time.time()) < 600
        assert f'bimdist_last_steps{{instance="",job="bimdist-push",replica="0",stage="{stage}"}} 4' in pushed


def test_taken_metrics_port_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = cli("train", str(TINY), f"--run.dir={tmp_path}", "--run.steps=2", f"--metrics.port={port}")
    assert proc.returncode == 2
    assert f"metrics port {port}" in proc.stderr and "Address already in use" in proc.stderr


def test_promtool_accepts_the_deploy_files():
    promtool = need("promtool")
    rules = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                           capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run([promtool, "check", "config", "prometheus.yml"], capture_output=True, text=True,
                            cwd=DEPLOY / "prometheus")
    assert config.returncode == 0, config.stdout + config.stderr


def test_straggler_and_restart_alone_alerts_fire_on_such_series(tmp_path):
    """promtool's rule tests: the straggler alert fires for a replica whose own work per step is 3x its stage's
    median after 5 minutes, not for equal ones; the restart-alone alert after 15 minutes at 0. A rule with another
    threshold fails the same tests, so they can fail."""
    promtool = need("promtool")
    tests = ROOT / "tests" / "assets" / "promtool" / "straggler_test.yml"
    ok = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lax = tmp_path / "deploy" / "prometheus"
    lax.mkdir(parents=True)
    (lax / "alerts.yml").write_text((DEPLOY / "prometheus" / "alerts.yml").read_text().replace("1.5 * quantile",
                                                                                               "4 * quantile"))
    copy = tmp_path / "tests" / "assets" / "promtool"
    copy.mkdir(parents=True)
    (copy / "straggler_test.yml").write_text(tests.read_text())
    bad = subprocess.run([promtool, "test", "rules", str(copy / "straggler_test.yml")], capture_output=True, text=True)
    assert bad.returncode != 0 and "BimdistStragglerReplica" in bad.stdout + bad.stderr


def test_docker_compose_file_is_valid():
    compose = need("docker-compose")
    proc = subprocess.run([compose, "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert {"prometheus", "grafana", "pushgateway", "trainer"} <= set(services)
    assert services["trainer"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(ROOT / "deploy" / "Dockerfile").exists()
