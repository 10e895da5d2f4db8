"""Stage 0's data path on ImageNet-shaped JPEGs, side by side in one run: how many 224 px training samples per
second one stage-0 rank builds (read, decode, RandomResizedCrop + flip, batch, masking order), and how many cores
it would take to feed the GPUs.

The images are Fashion-MNIST's (Debian package, no download) made ImageNet-shaped: upscaled to 330-500 x 300-400
px, tinted RGB, with coarse and fine noise so that they do not compress to nothing (JPEG quality 90, ~45 KB).
Contenders, each in its own process, the single-core ones bound to one core:
- limits: JPEG decode alone, no crop, no batching, on one core (libjpeg-turbo via simplejpeg, the decoder the
  path uses; and PIL, which the path used before);
- (a) the path as it was before this benchmark existed (a frozen copy: webdataset streaming, PIL decode,
  torchvision's RandomResizedCrop on tensors, bicubic), on one core;
- (b) the path now, ``data.workers=0`` (the rank decodes on a thread of its own), one core, draft mode on;
- (c) the same with ``data.jpeg_draft=false``;
- (d) ``data.workers=1`` and (e) ``data.workers=2`` on every core of the machine (the data path alone);
- (f) (b) on shards written with ``bimdist data prepare folder --max-size 256``;
- (g) ``data.decode=cuda`` when a GPU is visible: the workers read, the GPU decodes (nvJPEG) and crops.
Rounds alternate the contenders; the table gives medians over rounds.

Targets: (b) >= 60% of the decode-alone limit; (f) >= 1.5x (a); (e) >= 1.8x (d); (b) >= (a); (g) >= 5000/s.

    python -m benchmarks.data [--images 1500] [--rounds 5]
    python -m benchmarks.data --quick
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, Check, base_parser, md_table, write_results

FASHION_TRAIN = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FASHION_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
BATCH = 64


# ---- the data ------------------------------------------------------------------------------------------------
def _imagenet_like(job: tuple[int, np.ndarray, int, float]) -> bytes:
    """One Fashion-MNIST image as an ImageNet-shaped RGB JPEG (deterministic in its index), ``size`` times
    ImageNet's typical sides (330-500 x 300-400)."""
    from PIL import Image

    index, img, quality, size = job
    rng = np.random.default_rng(index)
    w, h = round(size * int(rng.integers(330, 501))), round(size * int(rng.integers(300, 401)))
    base = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC)).astype(np.float32)  # [h, w]
    tint = rng.uniform(0.5, 1.0, 3)
    coarse = rng.normal(0, 12, (h // 4 + 1, w // 4 + 1, 3)).clip(-127, 127) + 128
    coarse = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR)).astype(np.float32)
    rgb = base[..., None] * tint + (coarse - 128) + rng.normal(0, 6, (h, w, 3)) + 40 * tint  # [h, w, 3]
    out = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_jpeg_tree(root: Path, count: int, *, workers: int | None = None, quality: int = 90,
                   size: float = 1.0) -> Path:
    """``root/train/<class>/<i>.jpg``: ``count`` ImageNet-shaped JPEGs made from Fashion-MNIST's train split (``size``
    scales their sides: 2.0 makes photo-sized ones, about 0.55 megapixels)."""
    from bimdist.data.prepare import FASHION_MNIST_CLASSES, default_workers, ordered_map, read_idx

    images, labels = read_idx(FASHION_TRAIN)[:count], read_idx(FASHION_LABELS)[:count]
    jobs = ((i, images[i], quality, size) for i in range(len(images)))
    for i, data in enumerate(ordered_map(_imagenet_like, jobs, workers=workers or default_workers(), chunksize=16)):
        folder = root / "train" / FASHION_MNIST_CLASSES[int(labels[i])].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(data)
    return root


# ---- the path as it was (frozen copy of bimdist/data/batches.py at commit 6d4ecf3, the baseline row) -----------
def legacy_batches(cfg, pattern: str):  # noqa: ANN001, ANN201
    """Yield batches the way stage 0 built them before data workers: one thread, per-sample PIL decode and
    torchvision's tensor RandomResizedCrop (bicubic), the global RNG seeded and restored per sample."""
    import torch
    import webdataset as wds
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    from bimdist.data.batches import mask_order
    from bimdist.data.stream import expand_shards
    from bimdist.model.masking import seed_for

    m, d = cfg.model, cfg.data
    transform = T.Compose([T.RandomResizedCrop(m.img_size, scale=d.crop_scale, interpolation=InterpolationMode.BICUBIC,
                                               antialias=True), T.RandomHorizontalFlip()])
    def epochs():  # noqa: ANN202 - the stream repeats, as data.epochs=null does
        for epoch in range(10**6):
            samples = wds.tarfile_to_samples()([{"url": u} for u in expand_shards(pattern)])
            yield from wds.shuffle(d.shuffle_buffer, initial=d.shuffle_buffer,
                                   seed=seed_for(cfg.run.seed, 4, epoch, 0))(samples)

    step, images, labels = 0, [], []
    for j, sample in enumerate(epochs()):
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"))
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # [C, H, W]
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed_for(cfg.run.seed, 5, 0, j, 0))
        try:
            images.append(transform(img))
        finally:
            torch.set_rng_state(state)
        labels.append(int(sample["cls"]))
        if len(images) == d.batch_size:
            yield torch.stack(images), torch.tensor(labels), mask_order(cfg, step, slice(0, d.batch_size))
            step, images, labels = step + 1, [], []


# ---- one measurement, in a process of its own -----------------------------------------------------------------
def measure(kind: str, pattern: str, *, batches: int, warmup: int = 2) -> dict:
    """Samples per second of one contender on the cores this process may use."""
    import torch

    torch.set_num_threads(1)
    if kind.startswith("decode-"):
        return decode_alone(kind.removeprefix("decode-"), pattern, seconds=max(1.0, batches * BATCH / 1000))
    from bimdist.config import load_config
    from bimdist.data.batches import train_batches
    from bimdist.data.stream import DataStats, Position

    workers = {"legacy": 0, "w0": 0, "w0-nodraft": 0, "w1": 1, "w2": 2, "gpu": 2}[kind]
    over = [f"--data.train_shards={pattern}", f"--data.batch_size={BATCH}", "--data.shuffle_buffer=200",
            f"--data.jpeg_draft={kind != 'w0-nodraft'}", f"--data.decode={'cuda' if kind == 'gpu' else 'cpu'}"]
    cfg = load_config("vit-base-16", over)
    workers0 = tree_cpu_seconds(children_only=True)
    if kind == "legacy":
        it = legacy_batches(cfg, pattern)
    else:
        device = torch.device("cuda") if kind == "gpu" else None
        it = (b.images for b in train_batches(cfg, replica=0, replicas=1, start_step=0, start=Position(),
                                              stats=DataStats(), workers=workers, device=device))
    for _ in range(warmup):  # worker start-up, first reads
        next(it)
    if kind == "gpu":
        torch.cuda.synchronize()
    t0, cpu0, n = time.perf_counter(), tree_cpu_seconds(), 0
    for _ in range(batches):
        out = next(it)
        n += len(out[0]) if kind == "legacy" else len(out)
    if kind == "gpu":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, tree_cpu_seconds() - cpu0
    in_workers = max(0.0, tree_cpu_seconds(children_only=True) - workers0)  # start-up and warm-up included
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return {"samples_per_s": n / wall, "samples_per_cpu_s": n / cpu, "cpu_cores_busy": cpu / wall, "samples": n,
            "worker_cpu_s": in_workers}


def tree_cpu_seconds(*, children_only: bool = False) -> float:
    """CPU seconds used so far by this process and its live children (the data workers), from /proc;
    ``children_only``: by the children alone."""
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if (int(entry) == me and not children_only) or int(fields[1]) == me:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def decode_alone(which: str, pattern: str, *, seconds: float) -> dict:
    """The limit row: JPEG bytes (already in memory) -> pixels, nothing else, for about ``seconds``."""
    import simplejpeg
    from PIL import Image

    from bimdist.data.stream import expand_shards
    from bimdist.data.tarindex import MemberReader, tar_samples

    reader = MemberReader()
    data = [reader.read(s["jpg"]) for u in expand_shards(pattern) for s in tar_samples(u)]  # every image the path sees

    def pil(b: bytes) -> None:
        with Image.open(io.BytesIO(b)) as im:
            im.load()

    fn = {"simplejpeg": lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"), "pil": pil}[which]
    for b in data[:20]:
        fn(b)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for b in data:
            fn(b)
        n += len(data)
    wall = time.perf_counter() - t0
    return {"samples_per_s": n / wall, "samples_per_cpu_s": n / wall, "cpu_cores_busy": 1.0, "samples": n,
            "worker_cpu_s": 0.0}


def run_measure(kind: str, pattern: str, *, cores: list[int], batches: int) -> dict:
    """``measure`` in a fresh process bound to ``cores`` (its data workers inherit the binding)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data", "--measure", kind, "--pattern", pattern,
                           "--batches", str(batches)], capture_output=True, text=True, timeout=1800, cwd=ROOT,
                          env=env, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    if proc.returncode != 0:
        raise RuntimeError(f"data benchmark {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the whole benchmark ---------------------------------------------------------------------------------------
CONTENDERS = {
    "decode-simplejpeg": "limit: JPEG decode alone, libjpeg-turbo (simplejpeg)",
    "decode-pil": "limit: JPEG decode alone, PIL",
    "legacy": "(a) the path before data workers (frozen copy)",
    "w0": "(b) data.workers=0, draft on",
    "w0-nodraft": "(c) data.workers=0, draft off",
    "w1": "(d) data.workers=1",
    "w2": "(e) data.workers=2",
    "w0-max256": "(f) data.workers=0, --max-size 256 shards",
    "gpu": "(g) data.decode=cuda, 2 workers",
}
ALL_CORES = {"w1", "w2", "gpu"}  # the others get one core


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500, help="ImageNet-shaped JPEGs to make")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=24, help="timed batches of 64 per measurement")
    parser.add_argument("--measure", default=None, help="internal: measure one contender, print JSON")
    parser.add_argument("--pattern", default=None, help="internal: the shards --measure reads")
    parser.add_argument("--gpu-only", action="store_true", help="only the decode limit and GPU decode (GPU check)")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure.removesuffix("-max256"), args.pattern, batches=args.batches)))
        return 0
    import torch

    from bimdist.data.prepare import prepare_folder
    from bimdist.distributed.env import usable_cores

    if args.quick:
        args.images, args.rounds, args.batches = 160, 1, 2
    cores = usable_cores()
    kinds = [k for k in CONTENDERS if k != "gpu" or torch.cuda.is_available()]
    if args.gpu_only:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu-only needs a CUDA device")
        kinds = ["decode-simplejpeg", "gpu"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tree = make_jpeg_tree(Path(tmp) / "jpeg", args.images)
        plain = prepare_folder(tree, Path(tmp) / "shards", shard_size=500)
        small = prepare_folder(tree, Path(tmp) / "shards256", shard_size=500, max_size=256)
        made_s = time.perf_counter() - t0
        shards = {"plain": str(Path(tmp) / "shards" / plain["train"]),
                  "max256": str(Path(tmp) / "shards256" / small["train"])}
        sizes = {k: sum(p.stat().st_size for p in (Path(tmp) / d).glob("*.tar")) / args.images
                 for k, d in (("plain", "shards"), ("max256", "shards256"))}
        rounds: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind in kinds:
                pattern = shards["max256" if kind.endswith("-max256") else "plain"]
                if args.quick:  # a smoke test: in this process, no core binding
                    rounds[kind].append(measure(kind.removesuffix("-max256"), pattern, batches=args.batches))
                else:
                    rounds[kind].append(run_measure(kind, pattern, cores=cores if kind in ALL_CORES else cores[:1],
                                                    batches=args.batches))
    med = {k: statistics.median(r["samples_per_s"] for r in v) for k, v in rounds.items()}
    busy = {k: statistics.median(r["cpu_cores_busy"] for r in v) for k, v in rounds.items()}
    per_core = {k: statistics.median(r["samples_per_cpu_s"] for r in v) for k, v in rounds.items()}
    in_workers = {k: statistics.median(r["worker_cpu_s"] for r in v) for k, v in rounds.items()}
    feed = scaling_rate()
    record = {"images": args.images, "batch": BATCH, "rounds": rounds, "median_samples_per_s": med,
              "cores_busy": busy, "samples_per_cpu_s": per_core, "worker_cpu_s": in_workers, "bytes_per_image": sizes,
              "made_and_prepared_s": made_s, "machine_cores": len(cores), "scaling_model_rate": feed}
    rows = [[CONTENDERS[k], len(cores) if k in ALL_CORES else 1, busy[k], med[k], per_core[k],
             min(r["samples_per_s"] for r in rounds[k]), max(r["samples_per_s"] for r in rounds[k])] for k in kinds]
    table = md_table(["contender", "cores it may use", "cores busy", "samples/s (median)", "samples per CPU-second",
                      "min samples/s", "max"], rows)
    if args.gpu_only:
        table += (f"\n\nGPU decode on this card: {med['gpu']:,.0f} samples/s of 224 px batches of {BATCH} "
                  f"({args.images} ImageNet-shaped JPEGs, median of {args.rounds} rounds).\n")
        table += "\n".join(c.line() for c in checks(record))
        write_results("data-gpu", record, table, args, checks=checks)
        return 0
    cpu_paths = [k for k in kinds if not k.startswith("decode-") and k not in ("gpu", "legacy")]
    best = max(cpu_paths, key=per_core.get)
    record.update(cores_to_feed=feed / per_core[best], best_per_core=best,
                  cores_to_feed_plain_shards=feed / per_core["w2"])
    table += (f"\n\n224 px batches of {BATCH} (vit-base-16's augmentation: RandomResizedCrop(0.2, 1) + flip, and "
              f"the masking order), {args.images} ImageNet-shaped JPEGs made from Fashion-MNIST "
              f"({sizes['plain'] / 1e3:.0f} KB each; {sizes['max256'] / 1e3:.0f} KB after --max-size 256), median "
              f"of {args.rounds} alternating rounds, every contender in its own process; cores busy = CPU time of "
              "the process and its data workers over wall time. Feeding the scaling model's ViT-B/16 rate on 4 H100 "
              f"stages ({feed:,.0f} samples/s) takes {feed / per_core['w2']:.0f} cores for stage 0 on plain shards "
              f"((e): {per_core['w2']:.0f} samples per CPU-second, the rank's reading included), "
              f"{feed / per_core[best]:.0f} at the best rate per core ({CONTENDERS[best]})"
              + (f"; GPU decode on this card: {med['gpu']:,.0f}/s." if "gpu" in med else
                 "; GPU decode (g) needs a GPU and has not run on this machine.") + "\n")
    table += "\n".join(c.line() for c in checks(record))
    write_results("data", record, table, args, checks=checks)
    return 0


def scaling_rate() -> float:
    """The scaling model's ViT-B/16 rate, 4 stages x 1 replica on H100s over NVLink (its default assumptions)."""
    from benchmarks.model import LINKS_GBPS, stage_costs
    from benchmarks.model import predict as predict_rate
    from bimdist.config import load_config

    costs = stage_costs(load_config("vit-base-16", ["--run.precision=fp32"]))
    link = LINKS_GBPS["NVLink (H100, 450 GB/s)"] * 1e9
    return predict_rate(costs, flop_per_s=989e12 * 0.4, link_bytes_per_s=link)["samples_per_s"]


def checks(record: dict) -> list[Check]:
    """Each ratio is the median of the rounds' ratios: the two sides of a ratio ran next to each other."""
    rounds = record["rounds"]

    def ratio(a: str, b: str, target: str, want: float) -> Check:
        per = [x["samples_per_s"] / y["samples_per_s"] for x, y in zip(rounds[a], rounds[b])]
        return Check(target, statistics.median(per), want, note=f"; rounds {[round(r, 2) for r in per]}")

    out = [] if "w0" not in rounds else [
        ratio("w0", "decode-simplejpeg", "stage 0 on one core (b) / JPEG decode alone", 0.6),
        ratio("w0-max256", "legacy", "--max-size 256 shards (f) / the path before (a)", 1.5),
        ratio("w2", "w1", "2 workers (e) / 1 worker (d)", 1.8),
        ratio("w0", "legacy", "workers=0 (b) / the path before (a)", 1.0),
    ]
    if "gpu" in rounds:
        out.append(Check("GPU decode samples/s", record["median_samples_per_s"]["gpu"], 5000.0))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
