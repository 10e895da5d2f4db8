"""Shared benchmark plumbing: machine description, result files named by hardware and date, README tables.

Every script writes ``benchmarks/results/<name>_<machine>_<date>.json`` (raw numbers, config, versions) and a
markdown table next to it, and rewrites its own section of the README between ``<!-- bench:<name> -->``
markers, so the tables in the README always come from a script run, never from typing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bimdist.model.unit import build_unit, unit_indices

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_tag(info: dict[str, Any]) -> str:
    if "gpu" in info:
        return re.sub(r"[^A-Za-z0-9]+", "-", info["gpu"]).strip("-").lower()
    return f"cpu{info['cores']}"


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds: a smoke test (results not kept)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README section")
    return p


def write_results(name: str, record: dict[str, Any], table: str, args: argparse.Namespace) -> Path:
    """JSON + markdown into the results folder; the README section too unless --quick / --no-readme."""
    info = record.setdefault("machine", machine())
    record.setdefault("date", dt.datetime.now().isoformat(timespec="seconds"))
    record.setdefault("command", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    record.setdefault("git", _git_rev())
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{machine_tag(info)}_{dt.date.today().isoformat()}" + ("_quick" if args.quick else "")
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    header = (f"_{name}: {record['date']}, {info.get('gpu') or info['cpu']} ({info['cores']} cores), "
              f"torch {info['torch']}, `{record['command']}`; raw numbers in `{shown}`._\n\n")
    (out / f"{stem}.md").write_text(header + table + "\n")
    if not args.quick and not args.no_readme:
        update_readme(name, header + table)
    print(header + table, flush=True)
    return path


def update_readme(name: str, body: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    readme.write_text(text)


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def random_batch(cfg: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed uint8 image batch and masking order for counting work (values do not matter, shapes do)."""
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, m.in_chans, m.img_size, m.img_size), dtype=torch.uint8, generator=g)
    return images, torch.argsort(torch.rand(n, m.num_patches, generator=g), dim=1)


def train_flops_per_sample(cfg: Any, n: int = 8) -> list[float]:
    """FLOPs of one training step (forward + backward, torch's flop counter) per sample, per unit (BIM: one per
    block; MAE: one), counted on a random batch of ``n``."""
    images, ids = random_batch(cfg, n)
    tokens, per_unit = None, []
    for i in unit_indices(cfg):
        unit = build_unit(cfg, i)
        with FlopCounterMode(display=False) as counter:
            out = unit(images, ids, tokens)
            out.loss.backward()
        tokens = out.tokens
        per_unit.append(counter.get_total_flops() / n)
    return per_unit


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, target: float, *, at_most: bool = False) -> str:
    ok = value <= target if at_most else value >= target
    return f"{'met' if ok else 'NOT met'} ({value:.3g} {'<=' if at_most else '>='} {target:g} wanted)"
