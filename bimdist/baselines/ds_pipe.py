"""End-to-end MAE as a DeepSpeed ``PipelineModule`` (the DeepSpeed peer of the throughput benchmark).

    torchrun --standalone --nproc_per_node=2 -m bimdist.baselines.ds_pipe CONFIG --steps 10 --microbatches 4

Gradients cross the stage boundary (ordinary backprop through the whole encoder); DeepSpeed's 1F1B-style
``TrainSchedule`` runs ``--microbatches`` micro-batches per optimizer step.
"""

from __future__ import annotations

import logging
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from timm.optim import param_groups_weight_decay

from bimdist.baselines.common import Timer, batches, default_split, parse, peak_over_ranks, prepare, report
from bimdist.baselines.mae_layers import mae_labels, mae_layers, mae_loss


class SplitPipelineModule(PipelineModule):
    """A PipelineModule cut at an explicit layer index (DeepSpeed only offers uniform / parameter balance)."""

    def __init__(self, layers: list[torch.nn.Module], *, cut: int, **kwargs):
        self._cut = cut
        super().__init__(layers=layers, **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        n = len(self._layer_specs)
        self.parts = [0, self._cut, n]
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    args, cfg = parse(__doc__.splitlines()[1], argv)
    device, backend = prepare(cfg)
    deepspeed.init_distributed(dist_backend=backend)
    if dist.get_world_size() != 2:
        print("ds_pipe runs on exactly 2 ranks", file=sys.stderr)
        return 2
    args.split = args.split or default_split(cfg.model.depth)
    layers = mae_layers(cfg)
    visible = layers[0].visible
    torch.manual_seed(cfg.run.seed)
    model = SplitPipelineModule(layers, cut=args.split, num_stages=2, loss_fn=mae_loss)
    micro = cfg.data.batch_size // args.microbatches
    ds_config = {"train_batch_size": cfg.data.batch_size, "train_micro_batch_size_per_gpu": micro,
                 "gradient_accumulation_steps": args.microbatches, "steps_per_print": 10**9}
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, cfg.optim.weight_decay), lr=cfg.lr,
                                  betas=cfg.optim.betas)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    stream = batches(cfg)

    def micro_batches():
        while True:
            batch = next(stream)
            labels = mae_labels(cfg, batch, visible)
            for m in range(args.microbatches):
                rows = slice(m * micro, (m + 1) * micro)
                yield (batch.images[rows], batch.ids_shuffle[rows]), labels[rows]

    it = micro_batches()
    timer, losses = Timer(device), []
    for _ in range(args.warmup + args.steps):
        dist.barrier()
        timer.start()
        loss = engine.train_batch(data_iter=it)
        timer.stop()
        losses.append(float(loss))
    peak = peak_over_ranks(device)  # the fuller of the two devices
    if dist.get_rank() == 0:
        report(args, cfg, name="deepspeed PipelineModule (MAE)", times=timer.times[args.warmup:], losses=losses,
               extra={"layers": len(layers), "device": str(device),
                      "peak_device_bytes": peak})
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
