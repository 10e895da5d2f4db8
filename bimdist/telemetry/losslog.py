"""Per-stage CSV of every step's losses (``RUN_DIR/losses/stage{k}_r{r}.csv``) and the loss plot made from them."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from bimdist.telemetry.progress import StepRecord

log = logging.getLogger("bimdist")

FIELDS = ["step", "block", "loss", "lr", "step_s", "compute_s", "recv_wait_s", "send_wait_s", "samples"]


class LossCSV:
    """Appends one row per block per step; a resumed run continues the same file."""

    def __init__(self, run_dir: Path, *, stage: int, replica: int):
        folder = Path(run_dir) / "losses"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"stage{stage}_r{replica}.csv"
        self._file = None
        self._writer: csv.writer | None = None

    def on_start(self, start_step: int) -> None:
        rows = read_losses(self.path) if self.path.exists() else []
        kept = [r for r in rows if int(r["step"]) < start_step]  # drop steps after the resume point
        self._file = open(self.path, "w", newline="")  # noqa: SIM115 - closed in on_end
        self._writer = csv.writer(self._file)
        self._writer.writerow(FIELDS)
        for r in kept:
            self._writer.writerow([r[f] for f in FIELDS])
        self._file.flush()

    def on_step(self, rec: StepRecord) -> None:
        assert self._writer is not None and self._file is not None
        for block, loss in zip(rec.blocks, rec.losses):
            self._writer.writerow([rec.step, block, f"{loss:.6g}", f"{rec.lr:.6g}", f"{rec.step_s:.4f}",
                                   f"{rec.compute_s:.4f}", f"{rec.recv_wait_s:.4f}", f"{rec.send_wait_s:.4f}",
                                   rec.samples])
        self._file.flush()

    def on_end(self, result: object) -> None:
        if self._file is not None:
            self._file.close()


def read_losses(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(run_dir: Path, out: Path | None = None) -> Path:
    """One line per block (all stages), loss against step, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[int, tuple[list[int], list[float]]] = {}
    for path in sorted((Path(run_dir) / "losses").glob("stage*_r0.csv")):
        for row in read_losses(path):
            steps, losses = series.setdefault(int(row["block"]), ([], []))
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for block in sorted(series):
        ax.plot(*series[block], label=f"block {block + 1}", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("local reconstruction loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    out = out or Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    log.info("wrote the loss plot to %s", out)
    return out
