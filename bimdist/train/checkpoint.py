"""Checkpoints: one file per block per step, written atomically, verified by hash, loaded weights-only.

Layout under ``RUN_DIR/checkpoints/step_00000100/``::

    block_00.pt  block_00.json   # state of block 0 and its sidecar (sha256, size, config fingerprint)
    ...
    data.json     data.meta       # the data stream's position after this step: global, for any layout
    manifest.json                 # written once every expected file is present

(Checkpoints written before the position was global have ``data_rRR.json`` per stage-0 replica instead; they
still load with the replica count they were written with.)

Stages write their own blocks independently; a step is *complete* when every block and data file and its
sidecar exist. Resume picks the newest complete step whose hashes verify and warns about any it skips.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bimdist.data.stream import Position

log = logging.getLogger("bimdist.checkpoint")

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message says which file and what to do."""


class IncompatibleCheckpoint(CheckpointError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> int:
    """Write via ``path.tmp-PID`` + fsync + rename: a crash or full disk never leaves a half-written ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write {path}: {e.strerror or e}; earlier checkpoints are untouched. "
            "Free disk space or point run.dir at a writable folder, then run the same command to resume"
        ) from None
    return path.stat().st_size


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointStore:
    def __init__(self, root: Path, *, fingerprint: str, blocks: list[int], replicas: int, keep: int):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.blocks = blocks  # every unit index of the whole model
        self.replicas = replicas
        self.keep = keep

    # ---- layout -------------------------------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def expected(self, step: int) -> list[Path]:
        d = self.step_dir(step)
        blocks = [d / f"block_{b:02d}.pt" for b in self.blocks]
        return blocks + self._data_files(step)

    def _data_files(self, step: int) -> list[Path]:
        d = self.step_dir(step)
        legacy = [d / f"data_r{r:02d}.json" for r in range(self.replicas)]
        if not (d / "data.json").exists() and legacy[0].exists():
            return legacy  # written before the position was global
        return [d / "data.json"]

    @staticmethod
    def sidecar(path: Path) -> Path:
        return path.with_suffix(".json") if path.suffix == ".pt" else path.with_name(path.stem + ".meta")

    def steps_on_disk(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit():
                steps.append(int(d.name[5:]))
        return sorted(steps, reverse=True)

    def is_complete(self, step: int) -> bool:
        return all(p.exists() and self.sidecar(p).exists() for p in self.expected(step))

    # ---- writing ------------------------------------------------------------------------------------------
    def _write_with_sidecar(self, path: Path, data: bytes, meta: dict) -> None:
        size = atomic_write(path, data)
        side = dict(meta, file=path.name, bytes=size, sha256=hashlib.sha256(data).hexdigest(),
                    fingerprint=self.fingerprint, format=FORMAT, time=time.time())
        atomic_write(self.sidecar(path), json.dumps(side, indent=1).encode())

    def save_block(self, step: int, block: int, state: dict[str, Any]) -> None:
        path = self.step_dir(step) / f"block_{block:02d}.pt"
        payload = dict(state, step=step, block=block, fingerprint=self.fingerprint, format=FORMAT)
        buf = io.BytesIO()  # serialise first, so a full disk surfaces as one OSError from the write below
        torch.save(payload, buf)
        self._write_with_sidecar(path, buf.getvalue(), {"step": step, "block": block})

    def save_position(self, step: int, position: Position) -> None:
        """The global stream's position after ``step`` (stage 0 replica 0 writes it for every replica)."""
        path = self.step_dir(step) / "data.json"
        body = json.dumps({"step": step, "epoch": position.epoch, "offset": position.offset})
        self._write_with_sidecar(path, body.encode(), {"step": step})

    def finish(self, step: int, *, protect: frozenset[int] = frozenset(), prune: bool = True) -> None:
        """Write the manifest once the step is complete, then (``prune``) drop old complete steps beyond ``keep``,
        except the ``protect``ed ones (steps some stage would restart from)."""
        if not self.is_complete(step):
            return
        manifest = {"step": step, "fingerprint": self.fingerprint, "blocks": self.blocks,
                    "files": [p.name for p in self.expected(step)]}
        atomic_write(self.step_dir(step) / "manifest.json", json.dumps(manifest, indent=1).encode())
        if not prune:
            return
        complete = [s for s in self.steps_on_disk() if self.is_complete(s)]
        for old in complete[self.keep :]:
            if old in protect:
                continue  # a stage restarted alone would resume from here
            shutil.rmtree(self.step_dir(old), ignore_errors=True)
            for engine_dir in self.root.glob(f"deepspeed/block_*/step_{old:08d}"):  # engine-side state
                shutil.rmtree(engine_dir, ignore_errors=True)

    # ---- reading ------------------------------------------------------------------------------------------
    def verify(self, step: int) -> str | None:
        """None if the step is complete and intact, else the reason it cannot be used."""
        return self._intact(self.expected(step))

    def own_files(self, step: int, blocks: list[int], replica: int, *, first: bool) -> list[Path]:
        """One stage's files of ``step``: its blocks (replica 0 writes them for every replica) and, for stage 0,
        this replica's data position."""
        d = self.step_dir(step)
        files = [d / f"block_{b:02d}.pt" for b in blocks]
        return files + (self._data_files(step)[:1] if first else [])

    def own_steps(self, blocks: list[int], replica: int, *, first: bool) -> list[int]:
        """Steps, newest first, whose files of this stage are all there and intact: what a stage restarted alone
        may resume from, whether or not the other stages' files of that step exist yet."""
        good = []
        for step in self.steps_on_disk():
            files = self.own_files(step, blocks, replica, first=first)
            # a partial step is skipped before its files are read (a foreign file there is not this run's error)
            if all(p.exists() and self.sidecar(p).exists() for p in files) and self._intact(files) is None:
                good.append(step)
        return good

    def _intact(self, files: list[Path]) -> str | None:
        """None if every file and its sidecar are there and match, else the reason. A file that vanishes while it
        is read (another stage's cleanup of an old step, which runs while this one lists its own steps) makes the
        step unusable, not the run."""
        for path in files:
            side = self.sidecar(path)
            if not path.exists() or not side.exists():
                return f"{path.name} is missing"
            try:
                meta = json.loads(side.read_text())
            except (OSError, ValueError) as e:
                return f"{side.name} is unreadable ({e})"
            if meta.get("fingerprint") != self.fingerprint:
                raise IncompatibleCheckpoint(
                    f"checkpoint {path} was written by a different config (fingerprint {meta.get('fingerprint')}, "
                    f"this run {self.fingerprint}: method, model or masking differ); use another run.dir "
                    "or start fresh with --fresh"
                )
            try:
                if meta.get("bytes") != path.stat().st_size or meta.get("sha256") != sha256_file(path):
                    return f"{path.name} does not match its recorded size/sha256 (corrupt or truncated)"
            except OSError as e:
                return f"{path.name} could not be read ({e.strerror or e}; removed by old-checkpoint cleanup?)"
        return None

    def latest(self) -> int | None:
        """Newest complete, intact step; corrupt or partial newer ones are skipped with a warning."""
        for step in self.steps_on_disk():
            if not self.is_complete(step):
                continue
            reason = self.verify(step)
            if reason is None:
                return step
            log.warning("checkpoint step %d is unusable: %s; falling back to an older one", step, reason)
        return None

    def load_block(self, step: int, block: int, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        path = self.step_dir(step) / f"block_{block:02d}.pt"
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {e}") from None
        if state.get("fingerprint") != self.fingerprint:
            raise IncompatibleCheckpoint(f"{path} belongs to a different config; use another run.dir or --fresh")
        return state

    def load_position(self, step: int, replica: int = 0) -> Position:
        """The data position of ``step``: the global one, or (an older checkpoint) this stage-0 replica's own."""
        path = self.step_dir(step) / "data.json"
        if not path.exists():
            path = self.step_dir(step) / f"data_r{replica:02d}.json"
            if not path.exists():
                raise IncompatibleCheckpoint(f"{path} is missing: the checkpoint was written before data positions "
                                             "were global, with another stage-0 replica count; resume with that "
                                             "count or --fresh")
        data = json.loads(path.read_text())
        return Position(epoch=int(data["epoch"]), offset=int(data["offset"]))

    def set_aside(self) -> Path | None:
        """For --fresh: move old checkpoints out of the way (never delete them)."""
        if not self.root.exists():
            return None
        dest = self.root.with_name(f"{self.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        self.root.rename(dest)
        return dest
