"""Per-stage recovery on this machine: fmnist-tiny as a 4-stage pipeline (real Fashion-MNIST shards), uninterrupted
and then with stages killed -9 mid-run under the standalone launcher, one run after the other.

- One kill of stage 2, half a checkpoint interval after a checkpoint: do stages 0, 1 and 3 keep their processes,
  how long after the kill does the restarted stage run its first step, does the run end with exit 0 and the
  uninterrupted run's weights (bit for bit)?
- Lost work: the stage-steps recomputed (the dead stage only, from its own checkpoint) against what a whole-job
  restart from the same checkpoint would recompute (every stage from it); the ratio approaches 1/S.
- Three kills of different stages in one run, stage 0 among them: does it still finish, exact?
- The shipped defaults (no ``--checkpoint.every``, timeouts and replay caps as shipped): one kill of stage 2 before
  the first checkpoint, so the stage restarts from the run's start and its upstream replays every step since.

Targets: first new step <= 30 s after the kill; exit 0 and bit-identical weights (both runs); other PIDs kept.

    python -m benchmarks.recovery [--steps 120]
    python -m benchmarks.recovery --quick
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.accuracy import ensure_data
from benchmarks.common import ROOT, Check, base_parser, md_table, write_results


def ranks_of(pid: int) -> dict[int, int]:
    """{RANK: pid} of the launcher's rank processes (not their data workers)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == pid:
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = int(entry)
    return found


def after_checkpoint(stage: int, step: int) -> str:
    return f"checkpoint stage={stage} replica=0 step={step} "


def after_progress(stage: int, step: int) -> str:
    return f"progress stage={stage} replica=0 step={step}/"


def train(args: list[str], run_dir: Path, log: Path, *, kills: list[tuple[int, str, float]]) -> dict:
    """One run; ``kills``: (stage, the log line it is killed after, seconds after that line). Returns what
    happened."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with open(log, "w") as f:
        job = subprocess.Popen([sys.executable, "-m", "bimdist", "train", *args, f"--run.dir={run_dir}"], stdout=f,
                               stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    events = []
    try:
        for stage, mark, delay in kills:
            deadline = time.monotonic() + 900
            while mark not in log.read_text() and time.monotonic() < deadline and job.poll() is None:
                time.sleep(0.2)
            time.sleep(delay)  # mid-interval: the stage has work since its checkpoint to lose
            before = ranks_of(job.pid)
            os.kill(before[stage], signal.SIGKILL)
            killed_at = time.time()
            n = len(re.findall(rf"recovery stage={stage} ", log.read_text()))
            while (len(re.findall(rf"recovery stage={stage} ", log.read_text())) == n
                   and time.monotonic() < deadline and job.poll() is None):
                time.sleep(0.2)
            after_pids = ranks_of(job.pid)
            # a rank that is gone has finished its steps (the tiny --quick model can, by now); one with a new PID
            # was restarted, which only the killed one may be
            events.append({"stage": stage, "killed_at": killed_at, "pids_before": before, "pids_after": after_pids,
                           "others_kept": all(after_pids.get(r, p) == p for r, p in before.items() if r != stage)})
        code = job.wait(timeout=3600)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    lines = re.findall(r"recovery stage=(\d+) replica=0 incarnation=(\d+) resumed_at_step=(\d+) "
                       r"first_step_s_after_death=([\d.]+)", text)
    unmatched = list(lines)
    for event in events:  # each kill's restart: the next recovery line of that stage
        line = next((x for x in unmatched if int(x[0]) == event["stage"]), None)
        if line is not None:
            unmatched.remove(line)
            event.update(resumed_at=int(line[2]), first_step_s_after_death=float(line[3]))
    restarted = sorted(int(stage) for stage, *_ in lines)  # every restart of the run, whoever caused it
    return {"exit_code": code, "events": events, "log": str(log), "restarted_stages": restarted,
            "only_the_killed_restarted": restarted == sorted(stage for stage, _, _ in kills)}


def died_at_step(log: str, stage: int, nth: int) -> int:
    """The step the killed stage had reached: its upstream's need when it reconnected (recomputation starts at the
    restart point; what the dead one had done is what the next stage had received)."""
    needs = re.findall(rf"restarted stage {stage} alone .* the next stage needs step (\d+|None)", Path(log).read_text())
    value = needs[nth] if nth < len(needs) else "None"
    return int(value) if value != "None" else -1


def same_weights(a: Path, b: Path, step: int, blocks: int) -> bool:
    for block in range(blocks):
        x = torch.load(a / "checkpoints" / f"step_{step:08d}" / f"block_{block:02d}.pt", weights_only=True)["model"]
        y = torch.load(b / "checkpoints" / f"step_{step:08d}" / f"block_{block:02d}.pt", weights_only=True)["model"]
        if not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args(argv)
    if args.quick:
        steps, every, base = 48, 8, [str(ROOT / "tests/assets/tiny.yaml")]
    else:
        ensure_data()
        steps, every, base = args.steps, 20, ["fmnist-tiny"]
    shipped = [*base, f"--run.steps={steps}", "--pipeline.stages=4", "--pipeline.threads=1", f"--run.log_every={every}"]
    if args.quick:  # tiny.yaml shortens the timeouts; the defaults run sets them back
        shipped += ["--pipeline.peer_timeout_s=120", "--pipeline.startup_timeout_s=600"]
    common = [*shipped, f"--checkpoint.every={every}", "--pipeline.peer_timeout_s=60"]
    stages = 4
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(common, Path(tmp) / "ref", Path(tmp) / "ref.log", kills=[])
        ref_s = time.perf_counter() - t0
        # about half a checkpoint interval; --quick's tiny model steps too fast for that to land mid-run
        half = 0.0 if args.quick else ref_s / steps * every / 2
        one = train(common, Path(tmp) / "one", Path(tmp) / "one.log",
                    kills=[(2, after_checkpoint(2, 2 * every), half)])
        three = train(common, Path(tmp) / "three", Path(tmp) / "three.log",
                      kills=[(2, after_checkpoint(2, every), 0.0), (0, after_checkpoint(0, 2 * every), half),
                             (3, after_checkpoint(3, 3 * every), 0.0)])
        # the shipped settings: checkpoint.every=500 (beyond this run), the timeouts and replay caps as shipped
        defaults = train(shipped, Path(tmp) / "defaults", Path(tmp) / "defaults.log",
                         kills=[(2, after_progress(2, 2 * every), half)])
        exact_one = one["exit_code"] == 0 and same_weights(Path(tmp) / "ref", Path(tmp) / "one", steps, stages)
        exact_three = three["exit_code"] == 0 and same_weights(Path(tmp) / "ref", Path(tmp) / "three", steps, stages)
        exact_defaults = defaults["exit_code"] == 0 and same_weights(Path(tmp) / "ref", Path(tmp) / "defaults", steps,
                                                                     stages)
        died = died_at_step(one["log"], 2, 0)
    e = one["events"][0]
    recomputed = max(0, died - e["resumed_at"])
    whole_job = stages * max(0, died - e["resumed_at"])  # every stage back to the same checkpoint
    record = {"steps": steps, "checkpoint_every": every, "stages": stages, "reference_seconds": ref_s,
              "one_kill": one, "three_kills": three, "exact_one": exact_one, "exact_three": exact_three,
              "defaults_kill": defaults, "exact_defaults": exact_defaults,
              "died_at_step": died, "stage_steps_recomputed": recomputed, "whole_job_stage_steps": whole_job}
    rows = [[f"kill -9 of stage 2 {half:.0f} s after its step-{2 * every} checkpoint", one["exit_code"],
             e["others_kept"], e["first_step_s_after_death"], f"{e['resumed_at']} (reached {died})", exact_one]]
    for ev in three["events"]:
        rows.append([f"three kills: stage {ev['stage']}", three["exit_code"], ev["others_kept"],
                     ev["first_step_s_after_death"], ev["resumed_at"], exact_three])
    d = defaults["events"][0]
    rows.append([f"shipped defaults (no checkpoint yet): kill -9 of stage 2 at step {2 * every}", defaults["exit_code"],
                 d["others_kept"], d["first_step_s_after_death"], d["resumed_at"], exact_defaults])
    table = md_table(["run", "exit", "other stages kept their PIDs", "first new step, s after the kill",
                      "resumed at step", "weights equal the uninterrupted run"], rows)
    table += (f"\n\n{'tiny' if args.quick else 'fmnist-tiny'}, 4 stages (one process each, one thread), {steps} steps, "
              f"checkpoints every {every}; the uninterrupted run took {ref_s:.0f} s. Lost work for the single kill: "
              f"{recomputed} stage-steps recomputed (stage 2 from step {e['resumed_at']} to {died}), against "
              f"{whole_job} for a whole-job restart from the same checkpoint (ratio "
              f"{recomputed / whole_job if whole_job else float('nan'):.2f}, 1/S = {1 / stages:.2f}).\n"
              + "\n".join(c.line() for c in checks(record)))
    write_results("recovery", record, table, args, checks=checks)
    return 0


def checks(record: dict) -> list[Check]:
    e = record["one_kill"]["events"][0]
    return [
        Check("first new step of the restarted stage, s after the kill", e["first_step_s_after_death"], 30.0,
              at_most=True),
        Check("one kill: exit 0 and the uninterrupted run's weights (1 = yes)", float(record["exact_one"]), 1.0),
        Check("three kills (stage 0 among them): exit 0 and exact (1 = yes)", float(record["exact_three"]), 1.0),
        Check("one kill: the other stages kept their processes (1 = yes)", float(e["others_kept"]), 1.0),
    ] + ([
        Check("shipped defaults, kill before the first checkpoint: exit 0 and exact (1 = yes)",
              float(record["exact_defaults"]), 1.0),
        Check("shipped defaults: first new step of the restarted stage, s after the kill",
              record["defaults_kill"]["events"][0]["first_step_s_after_death"], 30.0, at_most=True),
    ] if "defaults_kill" in record else [])


if __name__ == "__main__":
    raise SystemExit(main())
