"""Stage 0's data path on real JPEG shards (ImageNet-shaped, made from Fashion-MNIST): data workers change no
bit, resume stays exact, corrupt samples are skipped and counted, workers die with their rank, --max-size, and the
GPU decode path's crops (run here on the CPU)."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.data import make_jpeg_tree
from bimdist.config import load_config
from bimdist.data.batches import train_batches
from bimdist.data.decode import CorruptSample, augmented, crop_params, decode_sample, draft_factor, image_size
from bimdist.data.loader import BatchAssembler, ChunkDecoder, RawChunks, decode_jpegs, make_stream
from bimdist.data.prepare import FASHION_MNIST_DIR, prepare_folder
from bimdist.data.stream import DataError, DataStats, Position, ShardStream
from bimdist.data.tarindex import MemberReader
from bimdist.distributed.launch import free_port
from bimdist.model.masking import seed_for
from tests.conftest import TINY, alive, ranks_of, start_cli, wait_for

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                reason="needs the Debian package dataset-fashion-mnist (.ci/run installs it)")
IMAGES = 120


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> dict:
    """120 ImageNet-shaped JPEGs in 4 shards, plus one truncated JPEG that every reader must skip."""
    root = tmp_path_factory.mktemp("jpeg")
    tree = make_jpeg_tree(root / "src", IMAGES)
    good = sorted((tree / "train").glob("*/*.jpg"))[0]
    (good.parent / "zz-broken.jpg").write_bytes(good.read_bytes()[:3000])
    info = prepare_folder(tree, root / "shards", shard_size=IMAGES // 4)
    return {"pattern": str(root / "shards" / info["train"]), "count": info["num_train"], "tree": tree, "root": root}


def jpeg_config(pattern: str, *extra: str):
    return load_config(str(TINY), ["--data.source=shards", f"--data.train_shards={pattern}", "--model.in_chans=3",
                                   "--model.img_size=32", "--data.mean=[0.5,0.5,0.5]", "--data.std=[0.25,0.25,0.25]",
                                   "--data.batch_size=16", "--data.shuffle_buffer=40", *extra])


def batches(cfg, workers: int, *, n: int, start_step: int = 0, start: Position = Position()) -> list:  # noqa: B008
    stats = DataStats()
    it = train_batches(cfg, replica=0, replicas=1, start_step=start_step, start=start, stats=stats, workers=workers)
    out = [b for _, b in zip(range(n), it)]
    it.close()
    return out, stats


def same(a, b) -> bool:
    return (a.step == b.step and a.position == b.position and torch.equal(a.images, b.images)
            and torch.equal(a.labels, b.labels) and torch.equal(a.ids_shuffle, b.ids_shuffle))


def test_batches_are_bit_identical_for_any_worker_count_and_after_a_resume(jpegs):
    cfg = jpeg_config(jpegs["pattern"])
    want, stats = batches(cfg, 0, n=12)  # 121 samples, one corrupt: batch 8 is in the second epoch, so is a skip
    assert want[-1].position.epoch == 1 and stats.corrupt == 2
    assert want[0].images.shape == (16, 3, 32, 32) and len(set(want[0].labels.tolist())) > 3
    for workers in (1, 2):
        got, got_stats = batches(cfg, workers, n=12)
        assert all(same(a, b) for a, b in zip(want, got)), f"{workers} workers changed the batches"
        assert got_stats.corrupt == 2
    for workers in (0, 2):  # resume in the middle of the first epoch
        tail, _ = batches(cfg, workers, n=7, start_step=5, start=want[4].position)
        assert all(same(a, b) for a, b in zip(want[5:], tail)), f"resume with {workers} workers differs"


def test_max_size_shards_bound_the_images_and_keep_labels_and_count(jpegs, tmp_path):
    small = prepare_folder(jpegs["tree"], tmp_path / "small", shard_size=IMAGES // 4, max_size=64, workers=2)
    assert small["num_train"] == jpegs["count"] and small["resized_train"] == IMAGES  # the broken one is kept as is
    reader = MemberReader()

    def samples(pattern: str) -> list[dict]:
        stream = ShardStream(pattern, seed=0, replica=0, replicas=1, shuffle_buffer=1, stats=DataStats(), epochs=1,
                             shuffle_shards=False)
        return [reader.materialize(raw.payload) for _, raw in stream.iterate(Position())]

    before, after = samples(jpegs["pattern"]), samples(str(tmp_path / "small" / small["train"]))
    assert [s["cls"] for s in before] == [s["cls"] for s in after]
    assert [s["__key__"] for s in before] == [s["__key__"] for s in after]
    sizes = [min(image_size(s["jpg"])) for s in after if decodes(s["jpg"])]
    assert len(sizes) == IMAGES and max(sizes) <= 64 and min(sizes) >= 63
    assert sum(len(s["jpg"]) for s in after) < 0.3 * sum(len(s["jpg"]) for s in before)


def decodes(data: bytes) -> bool:
    try:
        decode_sample(data, chans=3)
        return True
    except CorruptSample:
        return False


def test_cuda_decode_path_draws_the_cpu_path_crops(jpegs):
    """``data.decode: cuda`` run on the CPU: the workers plan the same crop windows as the CPU path, and the batch
    decoded and cropped from the bytes matches the CPU path's pixels within the filters' rounding."""
    cfg = jpeg_config(jpegs["pattern"], "--data.jpeg_draft=false")
    stats = DataStats()
    raw = next(iter(RawChunks(make_stream(cfg, stats=stats), start=Position(), stats=stats,
                              size=16)))
    encoded = ChunkDecoder(cfg, encoded=True)[raw]
    plain = ChunkDecoder(cfg, encoded=False)[raw]
    reader = MemberReader()
    assert len(encoded.encoded) == 16 and encoded.skipped == plain.skipped
    for i, (_, params) in encoded.encoded.items():
        _, sample = raw.samples[i]
        full = image_size(reader.read(sample.payload["jpg"]))
        assert params == crop_params(seed_for(cfg.run.seed, 5, *sample.uid), *full, scale=cfg.data.crop_scale,
                                     hflip=cfg.data.hflip)
    assembler = BatchAssembler(local=16, size=32, chans=3, stats=DataStats(), device=torch.device("cpu"))
    (gpu_path, labels, _), = list(assembler.feed(encoded))
    (cpu_path, cpu_labels, _), = list(BatchAssembler(local=16, size=32, chans=3, stats=DataStats()).feed(plain))
    assert torch.equal(labels, cpu_labels)
    diff = (gpu_path.float() - cpu_path.float()).abs()
    assert diff.mean() < 1.0 and diff.max() <= 12, (diff.mean(), diff.max())
    assert len(decode_jpegs([d for d, _ in encoded.encoded.values()], chans=3, device=torch.device("cpu"))) == 16


def test_a_worker_error_names_the_sample():
    cfg = load_config(str(TINY))
    stats = DataStats()
    raw = next(iter(RawChunks(make_stream(cfg, stats=stats), start=Position(), stats=stats,
                              size=4)))
    _, sample = raw.samples[2]
    sample.payload["synthetic"] = "not an index"  # a bug-like failure, not a corrupt image
    with pytest.raises(DataError, match=r"data worker failed on sample \(0, 2, 0\) in synthetic"):
        ChunkDecoder(cfg, encoded=False)[raw]


def test_draft_mode_decodes_a_big_jpeg_at_reduced_scale_and_keeps_the_view_close(tmp_path):
    """A 1200 x 900 JPEG and a crop of at least 2 x 224 px: draft mode decodes at 1/2 scale or less."""
    noise = torch.randint(0, 255, (45, 60, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "big.jpg"
    Image.fromarray(noise.numpy()).resize((1200, 900), Image.BICUBIC).save(path, quality=92)
    data = path.read_bytes()
    seed = next(s for s in range(100) if min(crop_params(s, 900, 1200, scale=(0.5, 1.0), hflip=False).height,
                                             crop_params(s, 900, 1200, scale=(0.5, 1.0), hflip=False).width) >= 448)
    assert draft_factor(crop_params(seed, 900, 1200, scale=(0.5, 1.0), hflip=False), 224) >= 2
    assert decode_sample(data, chans=3, factor=2).shape == (450, 600, 3)
    fast = augmented(data, seed, chans=3, size=224, scale=(0.5, 1.0), hflip=False, draft=True)
    full = augmented(data, seed, chans=3, size=224, scale=(0.5, 1.0), hflip=False, draft=False)
    assert fast.shape == full.shape == (3, 224, 224)
    assert (fast.float() - full.float()).abs().mean() < 3.0  # a smooth picture: the scaled IDCT loses little


def test_kill_9_of_a_stage0_rank_leaves_no_data_worker(jpegs, tmp_path):
    log = tmp_path / "job.log"
    job = start_cli("train", str(TINY), "--data.source=shards", f"--data.train_shards={jpegs['pattern']}",
                    "--model.in_chans=3", "--model.img_size=32", "--data.mean=[0.5,0.5,0.5]",
                    "--data.std=[0.25,0.25,0.25]", "--data.batch_size=16", "--data.workers=2",
                    f"--run.dir={tmp_path / 'run'}", "--run.steps=100000", "--pipeline.stages=2",
                    "--pipeline.peer_timeout_s=20", "--pipeline.stage_restarts=0", "--run.log_every=5", log_path=log)
    try:  # no restart: the job ends (a restarted rank would start new workers of its own)
        assert wait_for(lambda: "progress stage=1" in log.read_text(), 180), log.read_text()[-3000:]
        assert "stage 0 data: 2 worker processes" in log.read_text()
        rank0 = ranks_of(job.pid)[0]
        workers = children(rank0)
        assert len(workers) == 2, f"rank 0 ({rank0}) has children {workers}"
        os.kill(rank0, signal.SIGKILL)
        assert wait_for(lambda: not any(alive(p) for p in workers), 10, interval=0.2), \
            f"data workers {[p for p in workers if alive(p)]} outlived their rank"
        assert job.wait(timeout=120) != 0
    finally:
        if job.poll() is None:
            job.kill()


def test_a_corrupt_jpeg_read_by_a_worker_is_skipped_counted_in_the_metric_and_the_run_goes_on(jpegs, tmp_path):
    port = free_port()
    log = tmp_path / "job.log"
    job = start_cli("train", str(TINY), "--data.source=shards", f"--data.train_shards={jpegs['pattern']}",
                    "--model.in_chans=3", "--model.img_size=32", "--data.mean=[0.5,0.5,0.5]",
                    "--data.std=[0.25,0.25,0.25]", "--data.batch_size=16", "--data.workers=1",
                    f"--run.dir={tmp_path / 'run'}", "--run.steps=100000", f"--metrics.port={port}",
                    "--run.log_every=5", log_path=log)

    def corrupt_metric() -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        line = next((ln for ln in text.splitlines() if ln.startswith("bimdist_corrupt_samples_total{")), None)
        return float(line.split()[-1]) if line else 0.0

    try:
        assert wait_for(lambda: corrupt_metric() >= 1, 180), log.read_text()[-3000:]
        steps = progress_steps(log)
        assert wait_for(lambda: progress_steps(log) > steps, 60), "the run stopped after the corrupt sample"
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 75
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert "skipped corrupt sample train" in text and "undecodable image" in text and "shards/train-" in text


def progress_steps(log: Path) -> int:
    lines = [ln for ln in log.read_text().splitlines() if "progress stage=0" in ln]
    return int(lines[-1].split("step=")[1].split("/")[0]) if lines else 0


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def test_prepare_uses_every_core_and_writes_the_same_samples(jpegs, tmp_path):
    one = prepare_folder(jpegs["tree"], tmp_path / "one", shard_size=50, max_size=100, workers=1)
    two = prepare_folder(jpegs["tree"], tmp_path / "two", shard_size=50, max_size=100, workers=2)
    reader = MemberReader()

    def contents(folder: Path, info: dict) -> list[tuple]:
        stream = ShardStream(str(folder / info["train"]), seed=0, replica=0, replicas=1, shuffle_buffer=1,
                             stats=DataStats(), epochs=1, shuffle_shards=False)
        return [tuple(sorted((k, v) for k, v in reader.materialize(raw.payload).items() if k != "__url__"))
                for _, raw in stream.iterate(Position())]

    assert contents(tmp_path / "one", one) == contents(tmp_path / "two", two)
