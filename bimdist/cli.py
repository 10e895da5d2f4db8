"""The ``bimdist`` command: train, finetune, export, eval, recon, data prepare, trace merge.

Exit codes: 0 success, 1 unexpected error, 2 bad input or config, 3 a peer stage died or went silent,
4 no usable data, 5 a checkpoint could not be written, 75 preempted (checkpointed; rerun to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bimdist import __version__
from bimdist.config import ConfigError, load_config, preset_names
from bimdist.train.signals import EXIT_CONFIG, EXIT_DATA, EXIT_ERROR

log = logging.getLogger("bimdist")

TRAIN_HELP = """\
Overrides take the form --section.key=value (values are YAML: --model.layers_per_block=[1,2,1]).
Sections: method, model, masking, data, optim, pipeline, metrics, checkpoint, run, eval.
Presets: {presets}."""


FINETUNE_HELP = """\
Overrides take the form --section.key=value: --finetune.* (the recipe: labels, init, epochs, blr, layer_decay, ...),
--data.*, --pipeline.* (device, threads, timeouts), --metrics.*. Results go to RUN_DIR/finetune-depthK/result.json.
Examples:
  bimdist finetune runs/fmnist-tiny --depth 4 --finetune.labels=0.1
  bimdist finetune runs/fmnist-tiny --depth 4 --finetune.init=scratch      # the same recipe from random init
  bimdist finetune runs/fmnist-tiny --depth 4 --finetune.replicas=2        # 2 data-parallel ranks
  torchrun --nproc_per_node=4 -m bimdist finetune runs/vitb --depth 4"""


def _eval_help() -> str:
    """The ``--eval.key=value`` overrides ``bimdist eval`` takes, with their defaults, from the config model."""
    from bimdist.config import EvalConfig

    lines = ["Overrides of the eval section (the model and data come from the run's config.yaml):"]
    for name, field in EvalConfig.model_fields.items():
        doc = f"  {field.description}" if field.description else ""
        lines.append(f"  --eval.{name}={field.default}{doc}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bimdist", description="Block-wise masked image modeling, distributed.")
    p.add_argument("--version", action="version", version=f"bimdist {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND",
                           help="train | finetune | doctor | export | eval | recon | data | trace (COMMAND --help "
                           "for more)")
    t = sub.add_parser("train", help="train (spawns local stages when pipeline.stages x replicas > 1)",
                       epilog=TRAIN_HELP.format(presets=", ".join(preset_names())),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="YAML file or preset name")
    t.add_argument("--fresh", action="store_true", help="ignore checkpoints in run.dir (they are moved aside)")
    e = sub.add_parser("export", help="write the first K blocks as a timm ViT (safetensors + kwargs JSON)")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--depth", type=int, required=True, help="number of blocks K to keep")
    e.add_argument("--out", type=Path, required=True, help="PATH.safetensors (kwargs go to PATH.json)")
    v = sub.add_parser("eval", help="linear probe and kNN at every depth, with a raw-pixel baseline "
                       "(--eval.key=value overrides the eval section)", epilog=_eval_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("run_dir", type=Path)
    v.add_argument("--train-samples", type=int, default=None)
    v.add_argument("--test-samples", type=int, default=None)
    ft = sub.add_parser("finetune", help="fine-tune the first K blocks on labels (MAE's recipe), data-parallel "
                        "(--finetune.key=value overrides the recipe)", epilog=FINETUNE_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ft.add_argument("source", type=Path, help="a run folder, or an exported PATH.safetensors")
    ft.add_argument("config", nargs="?", help="preset or YAML whose data and finetune sections to use (default: the "
                    "run's config.yaml; required for an export)")
    ft.add_argument("--depth", type=int, default=None, help="blocks 1..K of the run to keep")
    ft.add_argument("--fresh", action="store_true", help="ignore this fine-tuning's checkpoints (moved aside)")
    dr = sub.add_parser("doctor", help="check this node for a job and predict its rate (under a minute)",
                        epilog="Overrides take the form --section.key=value, as for train.")
    dr.add_argument("config", nargs="?", help="YAML file or preset name")
    dr.add_argument("--json", type=Path, default=None, help="also write the table and figures here")
    dr.add_argument("--devices", type=int, default=None, help="also choose the replica count per stage for N "
                    "devices from the measured stage costs (what pipeline.replicas=auto does)")
    dr.add_argument("--link-gbps", type=float, default=None, help="the rate of the link between the nodes of "
                    "neighbouring stages, Gbit/s (e.g. from python -m bimdist.distributed.probe), instead of the "
                    "measured local link; says when the job is link-bound")
    r = sub.add_parser("recon", help="write the reconstruction PNG of a run's newest checkpoint")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--out", type=Path, default=None)
    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_verb", required=True)
    pf = dsub.add_parser("prepare", help="convert a dataset to webdataset shards")
    psub = pf.add_subparsers(dest="dataset", required=True)
    fm = psub.add_parser("fashion-mnist", help="Fashion-MNIST IDX files -> shards")
    fm.add_argument("--out", type=Path, required=True)
    fm.add_argument("--src", type=Path, default=None, help="folder with the *-ubyte.gz files")
    fm.add_argument("--limit", type=int, default=None, help="keep only the first N images per split")
    fm.add_argument("--shard-size", type=int, default=5000)
    fm.add_argument("--workers", type=int, default=None, help="processes (default: every core this one may use)")
    fo = psub.add_parser("folder", help="class-folder tree (SRC/train/<class>/...) -> shards")
    fo.add_argument("src", type=Path)
    fo.add_argument("--out", type=Path, required=True)
    fo.add_argument("--shard-size", type=int, default=1000)
    fo.add_argument("--max-size", type=int, default=None,
                    help="re-encode images whose shorter side is above N pixels to N (smaller shards, faster decode)")
    fo.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    fo.add_argument("--workers", type=int, default=None, help="processes (default: every core this one may use)")
    tr = sub.add_parser("trace", help="pipeline timeline tools")
    tsub = tr.add_subparsers(dest="trace_verb", required=True)
    tm = tsub.add_parser("merge", help="merge per-rank spans into one Chrome/Perfetto trace JSON")
    tm.add_argument("run_dir", type=Path)
    tm.add_argument("--out", type=Path, default=None)
    return p


def pop_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """Remove the ``--local_rank`` the deepspeed launcher inserts (anywhere, ``=N`` or ``N``); return it."""
    out, local_rank, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in ("--local_rank", "--local-rank"):
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            local_rank = int(value) if value.isdigit() else None
        else:
            out.append(arg)
        i += 1
    return out, local_rank


def missing_input(args: argparse.Namespace) -> str | None:
    """What a non-train command needs on disk and does not find, phrased with the fix; None when all is there."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir is not None and args.verb in ("export", "eval", "recon"):
        if not run_dir.is_dir():
            return f"run folder {run_dir} does not exist; give the run.dir of a `bimdist train` run"
        if not (run_dir / "config.yaml").is_file():
            return f"{run_dir} has no config.yaml, so it is not a bimdist run folder (train writes one there)"
    if args.verb == "trace" and not (run_dir / "trace").is_dir():
        return f"{run_dir / 'trace'} does not exist; train with --metrics.trace=true first"
    if args.verb == "data" and getattr(args, "dataset", None) == "folder" and not args.src.is_dir():
        return f"source folder {args.src} does not exist"
    return None


def main(argv: list[str] | None = None) -> int:
    argv, local_rank = pop_local_rank(list(sys.argv[1:] if argv is None else argv))
    args, rest = _parser().parse_known_args(argv)
    from bimdist.telemetry.progress import setup_logging

    if args.verb == "finetune":  # its own logging (rank tags) and error handling
        from bimdist.finetune.job import main as finetune_main

        return finetune_main(args.source, depth=args.depth, config=args.config, overrides=rest, argv=argv,
                             fresh=args.fresh, local_rank_arg=local_rank)

    if args.verb != "train":
        setup_logging()
        if rest and args.verb not in ("eval", "doctor"):
            print(f"bimdist {args.verb}: unexpected arguments {rest}", file=sys.stderr)
            return EXIT_CONFIG
        missing = missing_input(args)
        if missing:  # before torch and timm are imported: a typo costs a fraction of a second, not ten
            print(f"bimdist {args.verb}: {missing}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        if args.verb == "train":
            cfg = load_config(args.config, rest)
            if cfg.data.source == "shards":
                from bimdist.data.stream import check_shards

                check_shards(cfg.data.train_shards, cfg.data.test_shards)
            from bimdist.distributed.env import detect

            env = detect(local_rank_arg=local_rank)
            if cfg.pipeline.replicas == "auto" and env is None:  # measured here, once; the ranks get the counts
                if not cfg.pipeline.devices:
                    raise ConfigError("pipeline.replicas=auto needs the number of ranks to lay out: give "
                                      "--pipeline.devices=N, or start the job with a launcher (torchrun, srun)")
                from bimdist.distributed.placement import resolve_auto

                setup_logging("launcher")
                cfg = resolve_auto(cfg, devices=cfg.pipeline.devices)
                argv = [*argv, f"--pipeline.replicas={list(cfg.replica_counts)}"]
            if env is None and cfg.world_size > 1:
                from bimdist.distributed.launch import launch_standalone

                return launch_standalone(cfg, argv)  # spawns the ranks; imports no model code itself
            from bimdist.train.run import train

            return train(cfg, argv, fresh=args.fresh, local_rank_arg=local_rank)
        if args.verb == "doctor":
            from bimdist.doctor import doctor

            return doctor(load_config(args.config, rest), json_path=args.json, devices=args.devices,
                          link_gbps=args.link_gbps)
        if args.verb == "export":
            from bimdist.export import export

            export(args.run_dir, args.depth, args.out)
        elif args.verb == "eval":
            from bimdist.evaluate import evaluate_run

            evaluate_run(args.run_dir, train_samples=args.train_samples, test_samples=args.test_samples,
                         overrides=rest)
        elif args.verb == "recon":
            from bimdist.runs import load_units, run_config
            from bimdist.visualize import write_recon_png

            cfg = run_config(args.run_dir)
            units, _ = load_units(cfg, args.run_dir)
            write_recon_png(cfg, units, args.out or args.run_dir / "recon.png")
        elif args.verb == "data":
            from bimdist.data import prepare

            if args.dataset == "fashion-mnist":
                prepare.prepare_fashion_mnist(args.out, src=args.src, limit=args.limit, shard_size=args.shard_size,
                                              workers=args.workers)
            else:
                prepare.prepare_folder(args.src, args.out, shard_size=args.shard_size, max_size=args.max_size,
                                       quality=args.quality, workers=args.workers)
        elif args.verb == "trace":
            from bimdist.telemetry.trace import merge_traces

            merge_traces(args.run_dir, args.out)
        return 0
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:  # noqa: BLE001 - classify, then one clear line
        from bimdist.data.prepare import PrepareError
        from bimdist.data.stream import DataError
        from bimdist.train.checkpoint import CheckpointError

        if isinstance(e, (PrepareError, CheckpointError, ValueError, FileNotFoundError)):
            print(f"bimdist {args.verb}: {e}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(e, DataError):
            print(f"bimdist {args.verb}: data error: {e}", file=sys.stderr)
            return EXIT_DATA
        log.exception("unexpected error")
        return EXIT_ERROR
