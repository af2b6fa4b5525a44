"""The `resflow` command line.

    resflow storage up|down|status|env       a local S3 server (SeaweedFS) on loopback
    resflow ingest SRC DEST                  image files -> Parquet dataset
    resflow degrade SRC DEST --noise-sigma 25 clean dataset -> paired (image, target)
    resflow cluster up|down|status|env       a multi-node Ray cluster on this machine
    resflow train | evaluate | restore       the pipeline's steps (see each module's docstring)

Every command reads S3 endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_REGION (`eval "$(resflow storage env)"` sets them for the
local server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline import s3server

PROGRESS_PREFIX = "resflow progress: "  # `--json` restores print these to stderr; orchestrators parse them


def _columns(args):
    from pipeline.images import ImageColumns

    return ImageColumns(id=args.id_column, image=args.image_column, target=args.target_column)


def _add_column_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id-column", default="image_id", help="column with the unique image key")
    parser.add_argument("--image-column", default="image", help="column with the (degraded) image")
    parser.add_argument("--target-column", default="target", help="column with the clean reference")


def degradation_from_args(args):
    from pipeline.degrade import Degradation

    sigma_range = tuple(args.noise_sigma_range) if args.noise_sigma_range else None
    sigma = None if sigma_range else args.noise_sigma
    return Degradation(noise_sigma=sigma, noise_sigma_range=sigma_range, jpeg_quality=args.jpeg_quality,
                       blur_sigma=args.blur_sigma, downscale=args.downscale)


def add_degradation_flags(parser: argparse.ArgumentParser, default_sigma: float | None = 25.0) -> None:
    group = parser.add_argument_group("degradation (composable: blur -> downscale -> noise -> JPEG)")
    group.add_argument("--noise-sigma", type=float, default=default_sigma, help="Gaussian noise sigma on the 0-255 scale")
    group.add_argument("--noise-sigma-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="blind denoising: sigma drawn uniformly per image")
    group.add_argument("--jpeg-quality", type=int, help="JPEG round trip at this quality")
    group.add_argument("--blur-sigma", type=float, help="Gaussian blur sigma in pixels")
    group.add_argument("--downscale", type=int, help="bicubic down and up by this factor")


def cmd_storage(args) -> int:
    data_dir = args.dir or s3server.DEFAULT_DIR
    if args.action == "up":
        server = s3server.start(data_dir, port=args.port, buckets=tuple(args.bucket))
        print(f"SeaweedFS S3 is up: {server.endpoint_url} (pid {server.pid}, data in {server.data_dir})")
        print(f"buckets: {', '.join('s3://' + b for b in args.bucket)}")
        print("use it from this shell with:\n  eval \"$(resflow storage env" + (f" --dir {args.dir}" if args.dir else "") + ")\"")
        print("which sets:")
        for key, value in server.env().items():
            shown = value if key in ("AWS_ENDPOINT_URL", "AWS_REGION") else "<hidden>"
            print(f"  export {key}={shown}")
        return 0
    if args.action == "env":
        server = s3server.read_state(data_dir)
        if server is None:
            print(f"no local S3 server recorded in {data_dir}; run `resflow storage up` first", file=sys.stderr)
            return 1
        for key, value in server.env().items():  # for eval: goes to stdout only when asked
            print(f"export {key}={value}")
        return 0
    if args.action == "down":
        server = s3server.stop(data_dir)
        print("stopped " + repr(server) if server else f"no local S3 server recorded in {data_dir}")
        return 0
    state = s3server.status(data_dir)
    print(json.dumps(state, indent=2))
    return 0 if state["running"] else 1


def cmd_cluster(args) -> int:
    from pipeline import localcluster

    state_dir = args.dir or localcluster.DEFAULT_DIR
    if args.action == "up":
        cluster = localcluster.start(state_dir, nodes=args.nodes, cpus_per_node=args.cpus_per_node,
                                     head_cpus=args.head_cpus, object_store_mb=args.object_store_mb)
        print(f"local Ray cluster up: {len(cluster.nodes)} node(s), dashboard {cluster.dashboard_url}", file=sys.stderr)
        args.action = "env"
    if args.action == "env":
        cluster = localcluster.read_state(state_dir)
        if cluster is None:
            print(f"no local Ray cluster recorded in {state_dir}; start one with `resflow cluster up`", file=sys.stderr)
            return 1
        for key, value in cluster.env().items():
            print(f"export {key}={value}")
    elif args.action == "down":
        cluster = localcluster.stop(state_dir)
        print("stopped" if cluster else f"no local Ray cluster recorded in {state_dir}")
    else:
        print(json.dumps(localcluster.status(state_dir), indent=2))
    return 0


def cmd_ingest(args) -> int:
    from pipeline.ingest import ingest

    report = ingest(args.source, args.destination, rows_per_file=args.rows_per_file, progress=not args.quiet)
    print(f"{report.images} images -> {report.output}: {report.files_written} files written, "
          f"{report.files_skipped} already up to date")
    return 0


def cmd_degrade(args) -> int:
    from pipeline.ingest import degrade_dataset

    degradation = degradation_from_args(args)
    report = degrade_dataset(args.source, args.destination, degradation, seed=args.seed,
                             seed_per_image=args.seed_per_image, columns=_columns(args), progress=not args.quiet)
    print(f"{report.images} images degraded ({degradation.describe()}) -> {report.output}: "
          f"{report.files_written} files written, {report.files_skipped} already up to date")
    for file_uri, image_id, reason in report.failed:
        print(f"failed: {image_id} in {file_uri}: {reason}", file=sys.stderr)
    return 0


def cmd_split(args) -> int:
    from pipeline.ingest import split_dataset

    train_rows, val_rows = split_dataset(args.source, args.train, args.val, args.val_fraction, args.seed, _columns(args))
    print(f"{train_rows} rows -> {args.train}, {val_rows} rows -> {args.val}")
    return 0


def cmd_train(args) -> int:
    from pipeline.train import train, train_preset

    overrides = {"workers": args.workers, "max_minutes": args.max_minutes, "epochs": args.epochs,
                 "batch_size": args.batch_size, "patch_size": args.patch_size, "learning_rate": args.learning_rate,
                 "seed": args.seed, "cpus_per_worker": args.cpus_per_worker, "keep_checkpoints": args.keep_checkpoints}
    if args.gpu:
        overrides["use_gpu"] = True
    if args.model:
        overrides["model"] = args.model
    if args.model_config:
        overrides["model_config"] = json.loads(args.model_config)
    if args.noise_sigma_range or args.jpeg_quality or args.blur_sigma or args.downscale or args.noise_sigma != 25:
        overrides["degradation"] = degradation_from_args(args)
    overrides["columns"] = _columns(args)
    config = train_preset(args.preset, **overrides)
    result = train(args.data, args.val_data, args.output, config, run_name=args.run_name)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"best epoch {result.metrics.get('epoch')}: val PSNR {result.metrics.get('val_psnr', float('nan')):.2f} dB, "
              f"SSIM {result.metrics.get('val_ssim', float('nan')):.4f}\nmodel version {result.version} -> {result.model_uri}")
    return 0


def cmd_evaluate(args) -> int:
    from pipeline.evaluate import evaluate
    from pipeline.restore_core import RestoreSettings

    result = evaluate(args.model, args.data, noise_sigma=args.noise_sigma, seed=args.seed, columns=_columns(args),
                      settings=RestoreSettings(tile=args.tile))
    summary = result.summary()
    if args.json:
        print(json.dumps({**summary, **({"per_image": result.per_image} if args.per_image else {})}))
        return 0
    if args.per_image:
        print(f"{'image':<24} {'input PSNR':>10} {'output PSNR':>11} {'input SSIM':>10} {'output SSIM':>11}")
        for row in result.per_image:
            print(f"{row['image_id']:<24} {row['input_psnr']:>10.2f} {row['output_psnr']:>11.2f} "
                  f"{row['input_ssim']:>10.4f} {row['output_ssim']:>11.4f}")
    print(f"{summary['images']} images ({summary['protocol']}), model {summary['model_version']}: "
          f"PSNR {summary['input_psnr']:.2f} -> {summary['output_psnr']:.2f} dB, "
          f"SSIM {summary['input_ssim']:.4f} -> {summary['output_ssim']:.4f}")
    for image_id, reason in result.failed:
        print(f"failed: {image_id}: {reason}", file=sys.stderr)
    return 0


def cmd_restore(args) -> int:
    from pipeline.restore import RestoreJob, format_report, restore_dataset

    job = RestoreJob(input=args.input, output=args.output, model=args.model, workers=args.workers, use_gpu=args.gpu,
                     cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size, io_threads=args.io_threads, tile=args.tile, tile_overlap=args.tile_overlap, force=args.force,
                     stall_timeout_s=args.stall_timeout, columns=_columns(args), progress=not args.json)
    def progress(done: int, total: int) -> None:  # one line per published file: readable in Ray job logs
        print(f"{PROGRESS_PREFIX}{done}/{total} images", file=sys.stderr, flush=True)

    report = restore_dataset(job, log=(lambda message: print(message, file=sys.stderr)) if args.json else print,
                             on_progress=progress if args.json else None, ray_dashboard=False)
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0


def build_parser(extend=None) -> argparse.ArgumentParser:
    """`extend(commands)` adds subcommands: flows/cli.py adds the Prefect ones, so this
    module stays free of Prefect."""
    parser = argparse.ArgumentParser(prog="resflow", description="Restore image datasets with residual networks on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    if extend:
        extend(commands)

    p = commands.add_parser("storage", help="a local S3 server (SeaweedFS) for laptops and CI")
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--dir", help=f"data folder (default {s3server.DEFAULT_DIR})")
    p.add_argument("--port", type=int, help="S3 port (default: a free one); port + 10000 must be free too")
    p.add_argument("--bucket", action="append", default=None, help="bucket to create (repeatable; default resflow)")
    p.set_defaults(func=cmd_storage)

    p = commands.add_parser("cluster", help="a multi-node Ray cluster on this machine (one process group per node)")
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--dir", help="state folder (default ~/.resflow/cluster)")
    p.add_argument("--nodes", type=int, default=3, help="head + nodes-1 workers")
    p.add_argument("--cpus-per-node", type=int, default=2)
    p.add_argument("--head-cpus", type=int, default=0, help="CPUs the head offers (0: work runs on the workers)")
    p.add_argument("--object-store-mb", type=int, default=1024, help="object store per node")
    p.set_defaults(func=cmd_cluster)

    p = commands.add_parser("ingest", help="image files (folder, glob, s3:// prefix) -> Parquet dataset")
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--rows-per-file", type=int, default=64)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)

    p = commands.add_parser("degrade", help="clean dataset -> paired dataset (image degraded, target clean)")
    p.add_argument("source")
    p.add_argument("destination")
    add_degradation_flags(p)
    p.add_argument("--seed", type=int, default=0, help="noise seed; the protocol seeds every image with 0")
    p.add_argument("--seed-per-image", action="store_true", help="a distinct noise stream per image id")
    p.add_argument("--quiet", action="store_true")
    _add_column_flags(p)
    p.set_defaults(func=cmd_degrade)

    p = commands.add_parser("split", help="split a dataset into train and held-out validation by image id")
    p.add_argument("source")
    p.add_argument("train")
    p.add_argument("val")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    _add_column_flags(p)
    p.set_defaults(func=cmd_split)

    from pipeline.train import TRAIN_PRESETS

    p = commands.add_parser("train", help="train a residual model with Ray Train (local Ray or RAY_ADDRESS)")
    p.add_argument("--data", required=True, help="training dataset: clean images, or paired (image, target)")
    p.add_argument("--val-data", required=True, help="held-out dataset scored every epoch")
    p.add_argument("--output", required=True, help="model registry prefix; the best checkpoint is published there")
    p.add_argument("--preset", default="cpu", choices=sorted(TRAIN_PRESETS))
    p.add_argument("--model", help="override the preset's architecture (dncnn, resnet)")
    p.add_argument("--model-config", help='JSON, e.g. \'{"depth": 17, "width": 64}\'')
    p.add_argument("--workers", type=int)
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-minutes", type=float, help="wall-clock budget; the LR schedule anneals to it")
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--patch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--keep-checkpoints", type=int, help="best N checkpoints by validation PSNR kept in storage")
    p.add_argument("--run-name", help="reuse a name to resume that run from its latest checkpoint")
    p.add_argument("--json", action="store_true")
    add_degradation_flags(p)
    _add_column_flags(p)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("evaluate", help="PSNR/SSIM of a model on a paired or (with --noise-sigma) clean dataset")
    p.add_argument("--model", required=True, help="model folder or registry (its champion)")
    p.add_argument("--data", required=True)
    p.add_argument("--noise-sigma", type=float, help="clean data: add the protocol's Gaussian noise at this sigma")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--per-image", action="store_true")
    p.add_argument("--json", action="store_true")
    _add_column_flags(p)
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("restore", help="restore every image of a Parquet dataset with Ray Data")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model", required=True, help="model folder or registry (its champion)")
    p.add_argument("--workers", type=int, help="model replicas (default: from the cluster's CPUs or GPUs)")
    p.add_argument("--gpu", action="store_true", help="one GPU per replica, bf16")
    p.add_argument("--cpus-per-worker", type=float, default=0.5,
                   help="logical CPUs a CPU replica reserves (fractions leave Ray's own tasks room)")
    p.add_argument("--batch-size", type=int, help="rows per model call (default: 4 on CPU, 16 on GPU)")
    p.add_argument("--io-threads", type=int,
                   help="PNG decode/encode threads per replica (default: 1 on CPU; on GPU the node's CPUs per GPU but one)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--tile-overlap", type=int, default=64)
    p.add_argument("--force", action="store_true", help="restore every file, even those already done")
    p.add_argument("--stall-timeout", type=float, default=600, help="fail after this many seconds without progress")
    p.add_argument("--json", action="store_true", help="print the summary as one line of JSON")
    _add_column_flags(p)
    p.set_defaults(func=cmd_restore)
    return parser


def main(argv: list[str] | None = None, extend=None) -> int:
    parser = build_parser(extend)
    args = parser.parse_args(argv)
    if getattr(args, "bucket", "unset") is None:
        args.bucket = [s3server.DEFAULT_BUCKET]
    from pipeline.lease import LeaseHeld

    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except LeaseHeld as error:  # another run is writing the output: try again later (EX_TEMPFAIL)
        print(f"resflow {args.command}: busy: {error}", file=sys.stderr)
        return 75
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # job-level errors: one clear line, no traceback (RESFLOW_DEBUG=1 shows it)
        if os.environ.get("RESFLOW_DEBUG"):
            raise
        print(f"resflow {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
