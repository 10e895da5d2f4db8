"""The replay log: entries come back as they were sent, spill to segment files past the memory cap, go when pruned,
and past the disk cap the oldest are dropped, which the log reports as a restart it can no longer feed."""

import torch

from bimdist.distributed.replay import ReplayLog


def entry(step: int, n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((8,), step, dtype=torch.int64), torch.full((n,), step % 251, dtype=torch.uint8)


def test_spills_past_the_memory_cap_and_reads_back_exactly(tmp_path):
    log = ReplayLog(memory_bytes=3000, spill_path=tmp_path / "replay.log")
    for step in range(10):
        log.append(step, *entry(step))
    assert log.memory_bytes <= 3000 + 1064 and log.disk_bytes > 0
    assert [p.name for p in log.segment_files] == ["replay.00000.log"] and log.segment_files[0].stat().st_size > 0
    assert log.bytes == 10 * (1000 + 64) and log.steps == list(range(10))
    for step in range(10):
        header, payload = log.get(step, timeout_s=1)
        want = entry(step)
        assert torch.equal(header, want[0]) and torch.equal(payload, want[1])


def test_prune_drops_old_entries_and_deletes_spent_segments(tmp_path):
    log = ReplayLog(memory_bytes=3000, spill_path=tmp_path / "replay.log", segment_bytes=2200)  # 2 entries each
    for step in range(10):
        log.append(step, *entry(step))
    assert len(log.segment_files) == 4 and log.capped_below is None
    assert log.prune(4) == 4 and log.oldest() == 4 and log.get(2, timeout_s=0.1) is None
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["replay.00002.log", "replay.00003.log"]
    log.prune(9)
    assert log.steps == [9] and not list(tmp_path.iterdir())  # nothing spilled is live
    log.close()
    assert not list(tmp_path.iterdir())


def test_past_the_disk_cap_the_oldest_go_and_the_restart_point_says_whether_it_can_still_be_fed(tmp_path):
    log = ReplayLog(memory_bytes=3000, spill_path=tmp_path / "replay.log", disk_bytes=5000, segment_bytes=2200)
    for step in range(12):
        log.append(step, *entry(step))
    assert log.disk_bytes <= 5000 and log.bytes < 12 * 1064
    kept = log.steps
    assert kept == list(range(kept[0], 12)) and kept[0] > 0  # the newest stay, contiguous
    assert log.capped_below == kept[0]
    assert not log.restartable(0) and not log.restartable(kept[0] - 1) and log.restartable(kept[0])
    assert log.get(kept[0], timeout_s=0.1) is not None and log.get(0, timeout_s=0.1) is None
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 5000 + 2200  # spent segments are deleted
    log.close()
    assert not list(tmp_path.iterdir())


def test_without_replay_an_entry_goes_once_sent(tmp_path):
    log = ReplayLog(memory_bytes=1 << 20, spill_path=tmp_path / "r.log", keep=False)
    for step in range(3):
        log.append(step, *entry(step))
    log.sent(1)
    assert log.steps == [2]
