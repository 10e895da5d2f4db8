"""Writes tests/assets/fmnist-mini: real Fashion-MNIST images (Debian dataset-fashion-mnist) as small shards.

    python tests/assets/make_fmnist_mini.py

256 training images in 4 shards and 128 test images in 2 shards, plus one shard with deliberately corrupt
samples for the reader's skip-and-count path.
"""

import io
import tarfile
from pathlib import Path

from bimdist.data.prepare import _write_manifest, prepare_fashion_mnist

HERE = Path(__file__).parent / "fmnist-mini"


def main() -> None:
    info = prepare_fashion_mnist(HERE, limit=256, shard_size=64)
    # the test split is smaller: rewrite it with 128 images in 2 shards
    for f in HERE.glob("test-*.tar"):
        f.unlink()
    prepare_fashion_mnist(HERE / "tmp", limit=128, shard_size=64)
    for f in (HERE / "tmp").glob("test-*.tar"):
        f.rename(HERE / f.name)
    for f in (HERE / "tmp").iterdir():
        f.unlink()
    (HERE / "tmp").rmdir()
    info["test"], info["num_test"] = "test-{000000..000001}.tar", 128
    _write_manifest(HERE, info)
    # a shard with one good sample, one undecodable image and one sample without an image
    with tarfile.open(HERE / "corrupt-000000.tar", "w") as tar:
        good = (HERE / "train-000000.tar")
        with tarfile.open(good) as src:
            members = [m for m in src.getmembers() if m.name.startswith("train000000.")]
            for m in members:
                tar.addfile(m, src.extractfile(m))
        for name, data in [("bad000001.png", b"\x89PNG not really"), ("bad000001.cls", b"3"),
                           ("bad000002.cls", b"4")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    print(info)


if __name__ == "__main__":
    main()
