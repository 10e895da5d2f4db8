import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bimdist.config import load_config
from bimdist.data.batches import train_batches
from bimdist.data.decode import CorruptSample, augmented, crop_params, decode_sample, image_bytes, label_of
from bimdist.data.prepare import FASHION_MNIST_DIR, PrepareError, prepare_fashion_mnist, prepare_folder, read_idx
from bimdist.data.stream import DataError, DataStats, Position, RawSample, ShardStream
from bimdist.data.tarindex import MemberReader
from tests.conftest import FMNIST_MINI, TINY

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                reason="needs the Debian package dataset-fashion-mnist (.ci/run installs it)")

TRAIN = f"{FMNIST_MINI}/train-{{000000..000003}}.tar"


def decoded(raw: RawSample, reader: MemberReader) -> tuple[torch.Tensor, int]:
    """uint8 [C, H, W] and the label of a raw sample."""
    payload = reader.materialize(raw.payload)
    return torch.from_numpy(decode_sample(image_bytes(payload)[1], chans=1)).permute(2, 0, 1), label_of(payload)


def test_prepare_fashion_mnist_writes_labelled_shards(tmp_path):
    info = prepare_fashion_mnist(tmp_path, limit=300, shard_size=100)
    assert info["train"] == "train-{000000..000002}.tar" and info["num_train"] == 300
    assert json.loads((tmp_path / "dataset.json").read_text())["num_test"] == 300
    labels = read_idx(Path(FASHION_MNIST_DIR) / "train-labels-idx1-ubyte.gz")[:300]
    pixels = read_idx(Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz")[:300]
    stream = ShardStream(str(tmp_path / info["train"]), seed=0, replica=0, replicas=1, shuffle_buffer=1,
                         stats=DataStats(), epochs=1, shuffle_shards=False)
    reader = MemberReader()
    got = [decoded(raw, reader) for _, raw in stream.iterate(Position())]
    assert [label for _, label in got] == labels.tolist()
    assert all(np.array_equal(img[0].numpy(), pixels[i]) for i, (img, _) in enumerate(got))


def test_prepare_fashion_mnist_missing_files_names_the_package(tmp_path):
    with pytest.raises(PrepareError, match="dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "out", src=tmp_path)


def test_read_idx_rejects_a_truncated_file(tmp_path):
    bad = tmp_path / "bad-idx1-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x10abc")
    with pytest.raises(PrepareError, match="header promises"):
        read_idx(bad)


def test_prepare_folder_tree(tmp_path):
    pixels = read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")[:12]
    for split, idx in (("train", range(0, 8)), ("val", range(8, 12))):
        for i in idx:
            cls = "boot" if i % 2 else "bag"
            (tmp_path / "src" / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i]).save(tmp_path / "src" / split / cls / f"{i}.png")
    (tmp_path / "src" / "train" / "bag" / "broken.jpg").write_bytes(b"not a jpeg")
    info = prepare_folder(tmp_path / "src", tmp_path / "out", shard_size=4)
    assert info["classes"] == ["bag", "boot"] and info["num_train"] == 9 and info["num_val"] == 4
    stats = DataStats()
    stream = ShardStream(str(tmp_path / "out" / info["train"]), seed=0, replica=0, replicas=1, shuffle_buffer=1,
                         stats=stats, epochs=1)
    views, reader = [], MemberReader()
    for _, raw in stream.iterate(Position()):
        try:
            views.append(decoded(raw, reader))
        except CorruptSample:
            stats.skip("x", "bad")
    assert len(views) == 8 and stats.corrupt == 1
    assert sorted(label for _, label in views) == [0] * 4 + [1] * 4


def test_corrupt_samples_are_skipped_counted_and_logged(caplog):
    cfg = load_config(str(TINY), ["--data.source=shards", f"--data.train_shards={FMNIST_MINI}/corrupt-000000.tar",
                                  "--data.batch_size=2", "--data.epochs=2", "--model.img_size=28"])
    stats = DataStats()
    with caplog.at_level("WARNING", logger="bimdist.data"):
        batches = list(train_batches(cfg, replica=0, replicas=1, start_step=0, start=Position(), stats=stats))
    # one good sample per epoch: two epochs make one batch of 2; 2 bad samples per epoch are skipped
    assert len(batches) == 1 and batches[0].images.shape == (2, 1, 28, 28)
    assert stats.corrupt == 4
    assert "skipped corrupt sample" in caplog.text and "bad000001" in caplog.text


def test_replicas_read_disjoint_shards_covering_all():
    stats = [DataStats(), DataStats()]
    streams = [ShardStream(TRAIN, seed=3, replica=r, replicas=2, shuffle_buffer=10, stats=stats[r]) for r in (0, 1)]
    for epoch in (0, 1):
        a, b = (set(s.shards_for_epoch(epoch)) for s in streams)
        assert not a & b and len(a | b) == 4
    with pytest.raises(DataError, match="cannot be split over 5"):
        ShardStream(TRAIN, seed=3, replica=0, replicas=5, shuffle_buffer=10, stats=DataStats())


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="shards are missing"):
        ShardStream(str(tmp_path / "x-{0..3}.tar"), seed=0, replica=0, replicas=1, shuffle_buffer=1, stats=DataStats())


@pytest.mark.parametrize("source", ["shards", "synthetic"])
def test_batches_are_deterministic_and_resume_mid_stream(source):
    over = ["--data.batch_size=32", f"--data.source={source}", "--model.img_size=28", f"--data.train_shards={TRAIN}"]
    cfg = load_config(str(TINY), over)
    full = list(zip(range(12), train_batches(cfg, replica=0, replicas=1, start_step=0, start=Position(),
                                             stats=DataStats())))
    again = list(zip(range(12), train_batches(cfg, replica=0, replicas=1, start_step=0, start=Position(),
                                              stats=DataStats())))
    for (_, a), (_, b) in zip(full, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.ids_shuffle, b.ids_shuffle)
    resume_at = 5  # crosses an epoch boundary for the 256-sample sources with batch 32 at step 8
    tail = train_batches(cfg, replica=0, replicas=1, start_step=resume_at, start=full[resume_at - 1][1].position,
                         stats=DataStats())
    for (_, want), got in zip(full[resume_at:], tail):
        assert want.step == got.step
        assert torch.equal(want.images, got.images) and torch.equal(want.labels, got.labels)
        assert torch.equal(want.ids_shuffle, got.ids_shuffle)
    assert full[-1][1].position.epoch == 1  # the stream really wrapped into a second epoch


def test_synthetic_replicas_split_the_global_batch():
    cfg = load_config(str(TINY), ["--data.batch_size=16"])
    whole = next(train_batches(cfg, replica=0, replicas=1, start_step=0, start=Position(), stats=DataStats()))
    halves = [next(train_batches(cfg, replica=r, replicas=2, start_step=0, start=Position(), stats=DataStats()))
              for r in (0, 1)]
    assert torch.equal(torch.cat([h.images for h in halves]), whole.images)
    assert torch.equal(torch.cat([h.ids_shuffle for h in halves]), whole.ids_shuffle)


def test_augmentation_is_a_function_of_the_sample_seed_and_leaves_global_rng_alone():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    views = [augmented(buf.getvalue(), seed, chans=1, size=28, scale=(0.2, 1.0), hflip=True, draft=True)
             for seed in (1, 2, 1)]
    assert torch.rand(4).equal(expected_next)  # the caller's random stream is unchanged
    assert views[0].equal(views[2]) and not views[0].equal(views[1])
    assert views[0].shape == (1, 28, 28) and views[0].dtype == torch.uint8


def test_crop_params_follow_random_resized_crop():
    """Inside the image, at an area fraction within the scale range (or the centre-crop fallback), and the same for
    the same seed; flips happen about half of the time."""
    params = [crop_params(seed, 300, 420, scale=(0.2, 1.0), hflip=True) for seed in range(400)]
    for p in params:
        assert 0 <= p.top and p.top + p.height <= 300 and 0 <= p.left and p.left + p.width <= 420
        assert 0.19 <= p.height * p.width / (300 * 420) <= 1.01 and 3 / 4 - 0.02 <= p.width / p.height <= 4 / 3 + 0.02
    assert params[7] == crop_params(7, 300, 420, scale=(0.2, 1.0), hflip=True)
    assert 150 < sum(p.flip for p in params) < 250
    assert not any(crop_params(s, 300, 420, scale=(0.2, 1.0), hflip=False).flip for s in range(50))
