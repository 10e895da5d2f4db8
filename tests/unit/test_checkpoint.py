import json
import shutil
from pathlib import Path

import pytest
import torch

from bimdist.data.stream import Position
from bimdist.train.checkpoint import CheckpointError, CheckpointStore, IncompatibleCheckpoint


def _store(root: Path, fingerprint: str = "abc", keep: int = 2) -> CheckpointStore:
    return CheckpointStore(root, fingerprint=fingerprint, blocks=[0, 1], replicas=1, keep=keep)


def _save(store: CheckpointStore, step: int, size: int = 10) -> None:
    for b in (0, 1):
        store.save_block(step, b, {"model": {"w": torch.full((size,), float(step + b))}})
    store.save_position(step, Position(0, step * 4))
    store.finish(step)


def test_roundtrip_manifest_and_weights_only_load(tmp_path):
    store = _store(tmp_path)
    _save(store, 10)
    assert store.latest() == 10
    manifest = json.loads((store.step_dir(10) / "manifest.json").read_text())
    assert manifest["files"] == ["block_00.pt", "block_01.pt", "data.json"]
    assert torch.equal(store.load_block(10, 1)["model"]["w"], torch.full((10,), 11.0))
    assert store.load_position(10) == Position(0, 40)


def test_incomplete_step_is_not_resumable(tmp_path):
    store = _store(tmp_path)
    _save(store, 10)
    store.save_block(20, 0, {"model": {}})  # block 1 never wrote step 20 (crashed)
    assert not store.is_complete(20) and store.latest() == 10


def test_corrupt_newest_falls_back_with_a_warning(tmp_path, caplog):
    store = _store(tmp_path)
    _save(store, 10)
    _save(store, 20)
    path = store.step_dir(20) / "block_01.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        assert store.latest() == 10
    assert "step 20 is unusable" in caplog.text and "block_01.pt" in caplog.text


def test_other_config_is_refused(tmp_path):
    _save(_store(tmp_path, "abc"), 10)
    with pytest.raises(IncompatibleCheckpoint, match="different config"):
        _store(tmp_path, "zzz").latest()


def test_keep_prunes_old_complete_steps(tmp_path):
    store = _store(tmp_path, keep=2)
    for step in (10, 20, 30):
        _save(store, step)
    assert store.steps_on_disk() == [30, 20]


def test_set_aside_moves_instead_of_deleting(tmp_path):
    store = _store(tmp_path / "checkpoints")
    _save(store, 10)
    moved = store.set_aside()
    assert moved is not None and (moved / "step_00000010" / "block_00.pt").exists()
    assert store.latest() is None


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tiny_disk):
    store = _store(tiny_disk / "checkpoints")
    _save(store, 10, size=100)
    with pytest.raises(CheckpointError, match="No space left on device.*earlier checkpoints are untouched"):
        _save(store, 20, size=1_000_000)  # 8 MB does not fit in 2 MiB
    assert store.latest() == 10 and store.verify(10) is None
    leftovers = [p.name for p in tiny_disk.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_unwritable_location_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    store = _store(tmp_path / "file" / "checkpoints")
    with pytest.raises(CheckpointError, match="cannot write .*file/checkpoints"):
        _save(store, 10)


def test_a_step_removed_while_it_is_read_is_skipped(tmp_path, monkeypatch):
    """Stages share the step folders: one stage's cleanup of an old step (``finish``) can remove it while another
    hashes its own files there (``own_steps``, right after its own checkpoint). That step is then unusable and the
    stage goes on; it used to die of FileNotFoundError (exit 1) in the middle of a run."""
    import bimdist.train.checkpoint as checkpoint

    store = _store(tmp_path, keep=3)
    for step in (10, 20, 30):
        _save(store, step)
    real, vanish = checkpoint.sha256_file, []

    def hash_racing_cleanup(path: Path) -> str:
        if vanish and path.parent == store.step_dir(vanish[0]):
            shutil.rmtree(path.parent)  # what the other stage's finish() does to an old step
            vanish.clear()
        return real(path)

    monkeypatch.setattr(checkpoint, "sha256_file", hash_racing_cleanup)
    vanish.append(10)
    assert store.own_steps([0], 0, first=True) == [30, 20]
    assert not vanish and not store.step_dir(10).exists()
    vanish.append(30)
    assert store.latest() == 20  # verify() of the newest step lost its files: the next one is used
    assert not vanish and store.steps_on_disk() == [20]
