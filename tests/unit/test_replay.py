"""The replay log: entries come back as they were sent, spill to a file past the memory cap, and go when pruned."""

import torch

from bimdist.distributed.replay import ReplayLog


def entry(step: int, n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((8,), step, dtype=torch.int64), torch.full((n,), step % 251, dtype=torch.uint8)


def test_spills_past_the_memory_cap_and_reads_back_exactly(tmp_path):
    log = ReplayLog(memory_bytes=3000, spill_path=tmp_path / "replay.log")
    for step in range(10):
        log.append(step, *entry(step))
    assert log.memory_bytes <= 3000 + 1064 and (tmp_path / "replay.log").stat().st_size > 0
    assert log.bytes == 10 * (1000 + 64) and log.steps == list(range(10))
    for step in range(10):
        header, payload = log.get(step, timeout_s=1)
        want = entry(step)
        assert torch.equal(header, want[0]) and torch.equal(payload, want[1])


def test_prune_drops_old_entries_and_truncates_the_spill_file(tmp_path):
    log = ReplayLog(memory_bytes=3000, spill_path=tmp_path / "replay.log")
    for step in range(10):
        log.append(step, *entry(step))
    assert log.prune(4) == 4 and log.oldest() == 4 and log.get(2, timeout_s=0.1) is None
    log.prune(9)
    assert log.steps == [9] and (tmp_path / "replay.log").stat().st_size == 0  # nothing spilled is live
    log.close()
    assert not (tmp_path / "replay.log").exists()


def test_without_replay_an_entry_goes_once_sent(tmp_path):
    log = ReplayLog(memory_bytes=1 << 20, spill_path=tmp_path / "r.log", keep=False)
    for step in range(3):
        log.append(step, *entry(step))
    log.sent(1)
    assert log.steps == [2]
