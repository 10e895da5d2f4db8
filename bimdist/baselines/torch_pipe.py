"""End-to-end MAE pipelined with ``torch.distributed.pipelining`` (GPipe or 1F1B), on 2 ranks.

    torchrun --standalone --nproc_per_node=2 -m bimdist.baselines.torch_pipe CONFIG --schedule 1f1b --microbatches 4
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from bimdist.baselines.common import Timer, batches, default_split, parse, peak_over_ranks, prepare, report
from bimdist.baselines.mae_layers import Chain, mae_labels, mae_layers, mae_loss

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def main(argv: list[str] | None = None) -> int:
    schedule_name = "1f1b"
    if argv is None:
        argv = sys.argv[1:]
    if "--schedule" in argv:
        i = argv.index("--schedule")
        schedule_name = argv[i + 1].lower()
        argv = argv[:i] + argv[i + 2 :]
    if schedule_name not in SCHEDULES:
        print(f"--schedule must be one of {sorted(SCHEDULES)}", file=sys.stderr)
        return 2
    args, cfg = parse(__doc__.splitlines()[1], argv)
    device, backend = prepare(cfg)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        print("torch_pipe runs on exactly 2 ranks", file=sys.stderr)
        return 2
    args.split = args.split or default_split(cfg.model.depth)
    layers = mae_layers(cfg)
    visible = layers[0].visible
    module = Chain(layers[: args.split] if rank == 0 else layers[args.split :]).to(device)
    stage = PipelineStage(module, stage_index=rank, num_stages=2, device=device)
    schedule = SCHEDULES[schedule_name](stage, n_microbatches=args.microbatches, loss_fn=mae_loss)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(module, cfg.optim.weight_decay), lr=cfg.lr,
                                  betas=cfg.optim.betas)
    stream = batches(cfg)
    timer, losses = Timer(device), []
    for _ in range(args.warmup + args.steps):
        # Both ranks draw the same deterministic batch. Rank 0 builds it inside the timed step, as DeepSpeed's
        # train_batch and bimdist's stage 0 do; rank 1 only needs its labels and gets them untimed.
        batch = next(stream) if rank == 1 else None
        dist.barrier()
        timer.start()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            batch = next(stream)
            schedule.step(batch.images.to(device), batch.ids_shuffle.to(device))
        else:
            micro_losses: list[torch.Tensor] = []
            schedule.step(target=mae_labels(cfg, batch, visible).to(device), losses=micro_losses)
            losses.append(float(torch.stack(micro_losses).detach().mean()))
        optimizer.step()
        timer.stop()
    times = torch.tensor(timer.times[args.warmup :], device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step ends when both stages have finished it
    loss_t = torch.tensor(losses or [0.0] * (args.warmup + args.steps), device=device)
    dist.broadcast(loss_t, src=1)
    peak = peak_over_ranks(device)  # the fuller of the two devices
    if rank == 0:
        report(args, cfg, name=f"torch.distributed.pipelining {schedule_name} (MAE)", times=times.tolist(),
               losses=loss_t.tolist(), extra={"schedule": schedule_name, "layers": len(layers),
                                              "device": str(device),
                                              "peak_device_bytes": peak})
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
