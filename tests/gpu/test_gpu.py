"""What only a GPU can show: CUDA tensors through the transport, the single-GPU pipeline against the sequential
trainer, bf16 autocast, sliced decoders, steps free of host syncs, and nvJPEG decoding with the CPU path's crops.
Run by tests/gpu/run.sh; skipped where no CUDA device is visible."""

from __future__ import annotations

import pytest
import torch

from bimdist.config import load_config
from bimdist.model.masking import shuffle_ids
from bimdist.model.unit import unit_indices
from bimdist.train.worker import StageWorker
from tests.conftest import TINY, cli, load_block

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def batch(cfg, n: int = 16):  # noqa: ANN001, ANN201
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    images = torch.randint(0, 256, (n, m.in_chans, m.img_size, m.img_size), dtype=torch.uint8, generator=g)
    return images.to(CUDA), shuffle_ids(n, m.num_patches, generator=g).to(CUDA)


def l2(a: dict, b: dict) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5


def test_cuda_tensors_cross_the_transport():
    """Two ranks on this GPU (gloo, host-staged, as single-GPU mode runs them) and on two GPUs when there are."""
    from bimdist.distributed.probe import link_bytes_per_s

    shapes = [((64, 50, 768), "bfloat16"), ((64, 196), "int16"), ((64, 3, 224, 224), "uint8")]
    assert link_bytes_per_s(backend="gloo", devices=("cuda:0", "cuda:0"), shapes=shapes, staging=True) > 0
    if torch.cuda.device_count() > 1:
        assert link_bytes_per_s(backend="nccl", devices=("cuda:0", "cuda:1"), shapes=shapes) > 0


def test_single_gpu_pipeline_matches_the_sequential_trainer(tmp_path):
    """Stated tolerance: cuDNN/cuBLAS kernels may reduce in another order run to run, so the pipeline must sit
    within 1% (whole-block L2) of the sequential run's movement, not bit for bit as on the CPU."""
    common = [str(TINY), "--run.steps=8", "--pipeline.device=cuda"]
    seq = cli("train", *common, f"--run.dir={tmp_path / 'seq'}", timeout=300)
    assert seq.returncode == 0, seq.stderr[-3000:]
    pipe = cli("train", *common, f"--run.dir={tmp_path / 'pipe'}", "--pipeline.stages=2", timeout=300)
    assert pipe.returncode == 0, pipe.stderr[-3000:]
    assert "single-GPU mode" in pipe.stderr
    cfg = load_config(str(TINY))
    from bimdist.model.unit import build_unit

    for block in range(4):
        init = build_unit(cfg, block).state_dict()
        want, got = load_block(tmp_path / "seq", 8, block), load_block(tmp_path / "pipe", 8, block)
        assert l2(got, want) < 0.01 * l2(want, init), f"block {block}"


def test_bf16_autocast_trains():
    cfg = load_config(str(TINY), ["--run.precision=bf16"])
    worker = StageWorker(cfg, unit_indices(cfg), device=CUDA)
    images, ids = batch(cfg)
    first = torch.stack(worker.train_step(step=0, images=images, ids_shuffle=ids, tokens=None).losses)
    for step in range(1, 30):
        last = torch.stack(worker.train_step(step=step, images=images, ids_shuffle=ids, tokens=None).losses)
    assert torch.isfinite(last).all() and (last < first).all()


def test_sliced_decoders_give_the_same_gradients_on_the_gpu():
    plain = load_config(str(TINY))
    sliced = load_config(str(TINY), ["--model.decoder_chunks=3"])
    images, ids = batch(plain)
    losses = []
    for cfg in (plain, sliced):
        worker = StageWorker(cfg, [0], device=CUDA)
        out = worker.units[0](images, ids, None)
        out.loss.backward()
        losses.append((out.loss.detach(), [p.grad.clone() for p in worker.units[0].parameters()]))
    assert torch.allclose(losses[0][0], losses[1][0], rtol=1e-5)
    for a, b in zip(losses[0][1], losses[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_steady_state_steps_never_sync_with_the_host():
    """torch.cuda.set_sync_debug_mode("error") turns every host synchronisation into an exception."""
    cfg = load_config(str(TINY), ["--optim.clip_grad=1.0"])
    worker = StageWorker(cfg, unit_indices(cfg), device=CUDA)
    images, ids = batch(cfg)
    for step in range(3):  # optimizer state, allocator and kernel choices settle
        worker.train_step(step=step, images=images, ids_shuffle=ids, tokens=None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3, 8):
            worker.train_step(step=step, images=images, ids_shuffle=ids, tokens=None, log=step == 7)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_gpu_decode_draws_the_cpu_crops_and_nearly_the_same_pixels(tmp_path):
    from benchmarks.data import make_jpeg_tree
    from bimdist.data.loader import BatchAssembler, ChunkDecoder, RawChunks, make_stream
    from bimdist.data.prepare import prepare_folder
    from bimdist.data.stream import DataStats, Position

    tree = make_jpeg_tree(tmp_path / "src", 64)
    info = prepare_folder(tree, tmp_path / "shards", shard_size=32)
    cfg = load_config("vit-base-16", [f"--data.train_shards={tmp_path / 'shards' / info['train']}",
                                      "--data.batch_size=32", "--data.jpeg_draft=false"])
    stats = DataStats()
    raw = next(iter(RawChunks(make_stream(cfg, stats=stats), start=Position(), stats=stats,
                              size=32)))
    encoded, plain = ChunkDecoder(cfg, encoded=True)[raw], ChunkDecoder(cfg, encoded=False)[raw]
    (gpu, _, _), = BatchAssembler(local=32, size=224, chans=3, stats=DataStats(), device=CUDA).feed(encoded)
    (cpu, _, _), = BatchAssembler(local=32, size=224, chans=3, stats=DataStats()).feed(plain)
    assert gpu.device.type == "cuda"
    diff = (gpu.float().cpu() - cpu.float()).abs()
    assert diff.mean() < 2.0, diff.mean()
