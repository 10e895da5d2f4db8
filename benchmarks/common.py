"""Shared benchmark plumbing: machine description, result files named by hardware and date, README tables.

Every script writes ``benchmarks/results/<name>_<machine>_<date>.json`` (raw numbers, config, versions) and a
markdown table next to it, and rewrites its own section of ``benchmarks/README.md`` between
``<!-- bench:<name> -->`` markers. Each script also says which targets it checks (``checks(record)``); the top
README's headline table is rebuilt from the newest full result of every script. So no table or verdict in either
README is typed by hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bimdist.model.unit import build_unit, unit_indices

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCH_README = ROOT / "benchmarks" / "README.md"
TOP_README = ROOT / "README.md"
# result name -> the module whose ``checks(record)`` reads it, in the order of the headline table
# (accuracy's linear-probe targets are retired: fine-tuning is how BIM is judged; the probe stays a monitor)
HEADLINE = {"finetune": "benchmarks.finetune", "throughput-preset": "benchmarks.throughput",
            "throughput-light": "benchmarks.throughput", "memory": "benchmarks.memory", "flops": "benchmarks.flops",
            "data": "benchmarks.data", "data-gpu": "benchmarks.data", "layout": "benchmarks.layout",
            "model": "benchmarks.model", "doctor": "benchmarks.doctor", "recovery": "benchmarks.recovery",
            "network": "benchmarks.network"}


@dataclass(frozen=True)
class Check:
    """One target of a benchmark and the figure a run reached."""

    target: str  # what is wanted, in words: "pipeline efficiency (c)/bound"
    value: float
    want: float
    at_most: bool = False
    note: str = ""  # context shown after the verdict in the benchmark's own notes

    @property
    def met(self) -> bool:
        return self.value <= self.want if self.at_most else self.value >= self.want

    def line(self) -> str:
        return f"- {self.target}: {verdict(self.value, self.want, at_most=self.at_most)}" + (
            f" {self.note}" if self.note else "")


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


def write_results(name: str, record: dict[str, Any], table: str, args: argparse.Namespace, *,
                  checks: Any = None) -> Path:
    """JSON + markdown into the results folder; the README section too unless --quick / --no-readme. With
    ``checks`` (the script's ``checks(record)``) the JSON also keeps its verdicts, for readers that do not import
    the script."""
    if checks is not None:
        record["checks"] = [dict(target=c.target, value=c.value, want=c.want, at_most=c.at_most, met=c.met)
                            for c in checks(record)]
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
        replace_block(BENCH_README, name, header + table)
        replace_block(TOP_README, "headline", headline_table())
    print(header + table, flush=True)
    return path


def replace_block(readme: Path, name: str, body: str) -> None:
    """Rewrite the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` (appended if missing)."""
    text = readme.read_text() if readme.exists() else ""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    readme.write_text(text)


def newest_result(name: str, folder: Path = RESULTS) -> tuple[Path, dict[str, Any]] | None:
    """The newest full (not ``--quick``) result of benchmark ``name``, by the date it records."""
    found = []
    for path in folder.glob(f"{name}_*.json"):
        if path.stem.endswith("_quick") or path.stem.removeprefix(name).count("_") != 2:
            continue
        record = json.loads(path.read_text())
        found.append((record.get("date", ""), path.name, path, record))
    if not found:
        return None
    *_, path, record = max(found, key=lambda t: (t[0], t[1]))
    return path, record


def headline_table(folder: Path = RESULTS) -> str:
    """One row per target of every benchmark's newest full result, linked to that run's table."""
    rows, machines, links = [], {}, []
    for name, module in HEADLINE.items():
        found = newest_result(name, folder)
        if found is None:
            continue
        path, record = found
        where = record.get("machine", {})
        machines.setdefault(where.get("gpu") or f"{where.get('cpu', '?')} ({where.get('cores', '?')} cores)",
                            []).append(f"{name} {record.get('date', '')[:10]}")
        links.append(f"[{name}]: benchmarks/results/{path.with_suffix('.md').name}")
        for c in importlib.import_module(module).checks(record):
            rows.append([f"[{name}]", c.target, f"{c.value:.3g}", f"{'<=' if c.at_most else '>='} {c.want:g}",
                         "met" if c.met else "**not met**"])
    runs = "; ".join(f"{m}: {', '.join(names)}" for m, names in machines.items())
    table = md_table(["benchmark", "target", "figure", "wanted", ""], rows)
    return table + f"\n\nMeasured on {runs}.\n\n" + "\n".join(links)


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
