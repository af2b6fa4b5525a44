"""The `resflow` command line: the pipeline's commands.

    resflow ingest | degrade | split            build datasets
    resflow train | evaluate | restore          the steps: each parses its flags into one job (pipeline/jobs.py)
    resflow models list | show | promote        the model registry

The local development services (`resflow storage|cluster|up|down|status|env`) add their
commands from local/cli.py and the Prefect ones (`resflow flow|deploy|serve`) from
flows/cli.py; `resflow` itself is flows.cli:main. `python -m pipeline.cli` runs these
commands alone (what a Ray job or a container without Prefect runs).

Building the parser imports nothing heavy, so every `--help` answers at once; a command
imports what it runs. Every failure is one line on stderr (RESFLOW_DEBUG=1 shows the
traceback) and an exit status: 2 when the command as given cannot run (a bad flag, a
missing column, overlapping paths, a model that does not load, unreachable storage or
missing credentials), 75 when another run holds the output (try later), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

from pipeline.config import TRAIN_PRESETS, RestoreSettings, preset_summary
from pipeline.contract import ImageColumns
from pipeline.degradations import Degradation
from pipeline.jobs import EXECUTORS, EXIT_STATUS, Events, RestoreJob, restore_job, restore_setting_names


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; a flag's default shown after its help when it has one."""

    def _get_help_string(self, action):
        shown = action.default not in (None, False, argparse.SUPPRESS) and not action.required and action.nargs != 0
        return f"{action.help} (default: %(default)s)" if shown and action.help else action.help


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and a usage exit status, not argparse's usage block
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def command(commands, name: str, summary: str, examples: str, run) -> argparse.ArgumentParser:
    """A subcommand with its one-line summary, its examples, and the function that runs it."""
    parser = commands.add_parser(name, help=summary, description=summary, epilog=f"examples:\n{examples}\n",
                                 formatter_class=Formatter)
    parser.set_defaults(run=run)
    return parser


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one line of JSON on stdout")


def add_common_flags(parser: argparse.ArgumentParser, inference: bool = False) -> None:
    """What every dataset command ends with: inference settings (when it runs a model),
    the column names, --json."""
    if inference:
        add_settings_flags(parser)
    add_column_flags(parser)
    add_json_flag(parser)


def add_model_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder, or registry (its champion)")


def add_column_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("columns (the data contract; name yours if they differ)")
    group.add_argument("--id-column", default=ImageColumns.id, help="column with the unique image key")
    group.add_argument("--image-column", default=ImageColumns.image, help="column with the (degraded) image")
    group.add_argument("--target-column", default=ImageColumns.target, help="column with the clean reference")


def columns_from(args) -> ImageColumns:
    return ImageColumns(id=args.id_column, image=args.image_column, target=args.target_column)


def add_degradation_flags(parser: argparse.ArgumentParser, default_sigma: float | None) -> None:
    group = parser.add_argument_group("degradation (composable: blur -> downscale -> noise -> JPEG)")
    group.add_argument("--noise-sigma", type=float, default=default_sigma,
                       help="Gaussian noise sigma on the 0-255 scale")
    group.add_argument("--noise-sigma-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="blind denoising: a sigma drawn uniformly per image (or patch) from this range")
    group.add_argument("--jpeg-quality", type=int, help="JPEG round trip at this quality (1-95)")
    group.add_argument("--blur-sigma", type=float, help="Gaussian blur sigma in pixels")
    group.add_argument("--downscale", type=int, help="bicubic down and up by this factor")


def degradation_from(args) -> Degradation:
    sigma_range = tuple(args.noise_sigma_range) if args.noise_sigma_range else None
    return Degradation(noise_sigma=None if sigma_range else args.noise_sigma, noise_sigma_range=sigma_range,
                       jpeg_quality=args.jpeg_quality, blur_sigma=args.blur_sigma, downscale=args.downscale)


FP32_HELP = "compute in float32 (TF32 convolutions on NVIDIA GPUs) even where the hardware has bf16"


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference")
    group.add_argument("--tile", type=int, default=RestoreSettings.tile,
                       help="images larger than this are restored tile by tile (memory is bounded by the tile)")
    group.add_argument("--tile-overlap", type=int, default=RestoreSettings.tile_overlap,
                       help="pixels tiles overlap by; >= 4x the network's receptive radius keeps tiles seamless")
    group.add_argument("--batch-size", type=int, help="same-shaped images (or tiles) per forward pass; default: 1 on CPU, 16 on GPU")
    group.add_argument("--fp32", dest="bf16", action="store_false", default=RestoreSettings.bf16, help=FP32_HELP)


def settings_from(args) -> RestoreSettings:
    return RestoreSettings(tile=args.tile, tile_overlap=args.tile_overlap, batch_size=args.batch_size, bf16=args.bf16,
                           io_threads=getattr(args, "io_threads", None), skip_below=getattr(args, "skip_below", None))


class CliEvents(Events):
    """Log lines on stderr; a progress bar when a person watches a terminal."""

    def __init__(self, quiet: bool = False, unit: str = "img"):
        self.interactive = sys.stderr.isatty() and not quiet
        self.quiet, self.unit, self.bar = quiet, unit, None
        self.lock = threading.Lock()  # a restore's head start reports from its own thread

    def log(self, message: str) -> None:
        if self.quiet:
            return
        with self.lock:
            if self.bar is not None:
                self.bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)

    def progress(self, done: int, total: int) -> None:
        if not self.interactive:
            return
        with self.lock:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit=self.unit, file=sys.stderr)
            self.bar.total = total
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
                self.bar = None


def print_result(result: dict, args, text: str) -> None:
    print(json.dumps(result, default=str) if args.json else text, flush=True)


def check_storage(*uris: str) -> None:
    """Fail fast, in one line, when the storage behind `uris` cannot be reached or no
    credentials are set: a person at a terminal should not wait through the retry budget."""
    from pipeline import storage

    for uri in uris:
        storage.check_reachable(uri)


# --- datasets ----------------------------------------------------------------------------------


def run_ingest(args) -> int:
    from pipeline.ingest import ingest

    check_storage(args.destination)
    report = ingest(args.source, args.destination, rows_per_file=args.rows_per_file, progress=not args.quiet)
    print_result(report.__dict__, args, f"{report.images} images -> {report.output}: {report.files_written} files "
                                        f"written, {report.files_skipped} already up to date")
    return 0


def run_degrade(args) -> int:
    from pipeline.degrade import degrade_dataset

    check_storage(args.source, args.destination)
    degradation = degradation_from(args)
    report = degrade_dataset(args.source, args.destination, degradation, seed=args.seed,
                             seed_per_image=args.seed_per_image, columns=columns_from(args), progress=not args.quiet,
                             keep_target=not args.no_target)
    text = [f"{report.images} images degraded ({degradation.describe()}) -> {report.output}: "
            f"{report.files_written} files written, {report.files_skipped} already up to date"]
    text += [f"failed: {image_id} in {file_uri}: {reason}" for file_uri, image_id, reason in report.failed]
    print_result(report.__dict__, args, "\n".join(text))
    return 0


def run_split(args) -> int:
    from pipeline.ingest import split_dataset

    check_storage(args.source, args.train, args.val)
    train_rows, val_rows = split_dataset(args.source, args.train, args.val, args.val_fraction, args.seed,
                                         columns_from(args))
    print_result({"train": args.train, "train_rows": train_rows, "val": args.val, "val_rows": val_rows}, args,
                 f"{train_rows} rows -> {args.train}, {val_rows} rows -> {args.val}")
    return 0


# --- the steps ----------------------------------------------------------------------------------


def train_job_from(args) -> TrainJob:
    """The TrainJob that `resflow train`'s flags describe: the preset with the flags given."""
    from pipeline.config import train_preset
    from pipeline.jobs import TrainJob

    overrides = {"workers": args.workers, "max_minutes": args.max_minutes, "epochs": args.epochs,
                 "batch_size": args.batch_size, "patch_size": args.patch_size, "learning_rate": args.learning_rate,
                 "seed": args.seed, "cpus_per_worker": args.cpus_per_worker, "keep_checkpoints": args.keep_checkpoints,
                 "use_gpu": True if args.gpu else None, "bf16": False if args.fp32 else None,
                 "architecture": args.architecture, "self_supervised": True if args.self_supervised else None,
                 "balance_noise_levels": True if args.balance_noise_levels else None,
                 "architecture_config": json.loads(args.architecture_config) if args.architecture_config else None,
                 "columns": columns_from(args)}
    if args.noise_sigma_range or args.jpeg_quality or args.blur_sigma or args.downscale or args.noise_sigma is not None:
        if args.self_supervised:
            raise ValueError("--self-supervised learns from the noise already in --data: "
                             "drop the degradation flags (--noise-sigma, --jpeg-quality, ...)")
        if args.noise_sigma is None and not args.noise_sigma_range:
            args.noise_sigma = Degradation.noise_sigma
        overrides["degradation"] = degradation_from(args)
    return TrainJob(data=args.data, val_data=args.val_data, registry=args.registry,
                    config=train_preset(args.preset, **overrides), run_name=args.run_name)


def run_train(args) -> int:
    from pipeline.steps import run_step
    from pipeline.train import describe_epoch

    job = train_job_from(args)
    check_storage(job.data, job.val_data, job.registry)
    result = run_step(job, CliEvents(quiet=args.json))
    score = (f"val PSNR {result['val_psnr']:.2f} dB, SSIM {result.get('val_ssim', float('nan')):.4f}"
             if "val_psnr" in result else describe_epoch(result))
    print_result(result, args, f"best epoch {result.get('epoch')}: {score}\n"
                               f"model version {result['version']} -> {result['model']}")
    return 0


def run_evaluate(args) -> int:
    from pipeline.evaluate import format_evaluation, format_sigma_table
    from pipeline.jobs import EvaluateJob
    from pipeline.steps import run_step

    sigmas = args.noise_sigma or [None]
    jobs = [EvaluateJob(model=args.model, data=data, noise_sigma=sigma, seed=args.seed,
                        settings=settings_from(args), columns=columns_from(args), per_image=args.per_image)
            for data in args.data for sigma in sigmas]
    check_storage(args.model, *args.data)
    results = [run_step(job, CliEvents(quiet=args.json)) for job in jobs]
    if len(results) == 1:
        print_result(results[0], args, format_evaluation(results[0]))
    else:  # several datasets or sigmas: one table (the colour protocol: CBSD68 and Kodak24 at 15/25/50)
        print_result({"by_sigma": results}, args, format_sigma_table(results))
    return 0


def restore_job_from(args) -> RestoreJob:
    """The flags' names are the job's field names (their `dest`): the CLI and the flows
    build restore jobs with one builder, `jobs.restore_job`."""
    named = {name: value for name, value in vars(args).items() if name in restore_setting_names()}
    return restore_job(args.input, args.output, args.model, **named, id=args.id_column, image=args.image_column,
                       target=args.target_column)


def run_restore(args) -> int:
    from pipeline import raycluster
    from pipeline.steps import run_step
    from pipeline.restore import format_report

    job = restore_job_from(args)
    check_storage(job.input, job.output, job.model)
    # Ray starts only if the plan needs it (pipeline/restore/executors.py); in a process of
    # its own, local Ray without its dashboard saves ~210 MB and 10 processes (bench/README.md,
    # "Ray's dashboard"); a cluster keeps its own. Put back after: a process that goes on
    # (tests, a notebook) may train next, and training needs the dashboard.
    saved, raycluster.LOCAL_DASHBOARD = raycluster.LOCAL_DASHBOARD, False
    try:
        result = run_step(job, CliEvents(quiet=args.json))
    finally:
        raycluster.LOCAL_DASHBOARD = saved
    print_result(result, args, format_report(result))
    return 0


# --- the model registry -----------------------------------------------------------------------


def run_models(args) -> int:
    from pipeline import registry
    from pipeline.modelio import read_card

    check_storage(args.registry if args.action != "show" else args.model)
    if args.action == "list":
        champion = (registry.champion(args.registry) or {}).get("version")
        rows = [{"version": card.version, "champion": card.version == champion, "created": card.created,
                 "architecture": card.architecture, "channels": card.channels, "val_psnr": card.metrics.get("val_psnr")}
                for card in registry.versions(args.registry)]
        lines = [f"{'*' if row['champion'] else ' '} {row['version']:<40} {row['created']:<26} "
                 f"{row['architecture']:<8} {'colour' if row['channels'] == 3 else 'gray':<6} val PSNR {row['val_psnr'] if row['val_psnr'] is None else round(row['val_psnr'], 2)}"
                 for row in rows] or [f"no model versions in {args.registry}"]
        print_result({"registry": args.registry, "champion": champion, "versions": rows}, args,
                     "\n".join(lines + (["(* champion)"] if champion else [])))
    elif args.action == "show":
        card = read_card(registry.resolve(args.model))
        print_result({**card.__dict__, "kind": card.color_kind}, args,
                     f"{card.version}: {card.color_kind} model, {card.channels} channel(s)\n{card.to_json()}")
    else:
        record = registry.set_champion(args.registry, args.version, reason=args.reason)
        print_result(record, args, f"champion of {args.registry} is now {record['version']}")
    return 0


# --- the parser ---------------------------------------------------------------------------------


def add_commands(commands) -> None:
    p = command(commands, "ingest", "store image files (folder, glob, s3:// prefix) as a Parquet dataset",
                "  resflow ingest ./photos s3://resflow/photos/\n"
                "  resflow ingest './scans/*.tif' ./datasets/scans --rows-per-file 16", run_ingest)
    p.add_argument("source", help="folder, glob or s3:// prefix of image files (PNG, JPEG, TIFF, WebP, BMP)")
    p.add_argument("destination", help="dataset folder or s3:// prefix to write")
    p.add_argument("--rows-per-file", type=int, default=64, help="images per Parquet file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json_flag(p)

    p = command(commands, "degrade", "write a paired dataset (image degraded, target clean) from a clean one",
                "  resflow degrade s3://resflow/set12 s3://resflow/set12-noisy25 --noise-sigma 25\n"
                "  resflow degrade ./clean ./blind --noise-sigma-range 5 55 --seed-per-image\n"
                "  resflow degrade ./clean ./noisy-only --noise-sigma 25 --seed-per-image --no-target", run_degrade)
    p.add_argument("source", help="clean dataset")
    p.add_argument("destination", help="paired dataset to write (outside the source)")
    add_degradation_flags(p, default_sigma=Degradation.noise_sigma)
    p.add_argument("--seed", type=int, default=0, help="noise seed; the protocol seeds every image with 0")
    p.add_argument("--seed-per-image", action="store_true", help="a distinct noise stream per image id")
    p.add_argument("--no-target", action="store_true",
                   help="leave the clean target out: a noisy-only dataset, as self-supervised training takes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common_flags(p)

    p = command(commands, "split", "split a dataset into training and held-out validation by a hash of the id",
                "  resflow split s3://resflow/all s3://resflow/train s3://resflow/val --val-fraction 0.05", run_split)
    p.add_argument("source", help="dataset to split")
    p.add_argument("train", help="where the training rows go")
    p.add_argument("val", help="where the held-out rows go")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of ids held out (stable as data grows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the id hash")
    add_common_flags(p)

    presets = "\n".join(f"  {name:<16} {preset_summary(name)}" for name in TRAIN_PRESETS)
    p = command(commands, "train", "train a residual model with Ray Train and publish it to a model registry",
                "  resflow train --data s3://resflow/train --val-data s3://resflow/val --registry s3://resflow/models\n"
                "  RAY_ADDRESS=http://head:8265 resflow train ... --preset dncnn-paper --workers 8 --gpu\n"
                f"presets:\n{presets}", run_train)
    p.add_argument("--data", required=True, help="training dataset: clean images, or paired (image, target)")
    p.add_argument("--val-data", required=True, help="held-out dataset scored every epoch; picks the checkpoint")
    p.add_argument("--registry", "--output", required=True, dest="registry",
                   help="model registry prefix; the best checkpoint is published there as a new version")
    p.add_argument("--preset", default="cpu", choices=sorted(TRAIN_PRESETS), help="starting point (see below)")
    overrides = p.add_argument_group("overrides of the preset (default: the preset's)")
    overrides.add_argument("--architecture", choices=["dncnn", "resnet"], help="network family")
    overrides.add_argument("--architecture-config", metavar="JSON", help='e.g. \'{"depth": 17, "width": 64}\'')
    overrides.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    overrides.add_argument("--cpus-per-worker", type=float, help="logical CPUs each worker reserves")
    overrides.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast unless --fp32")
    overrides.add_argument("--fp32", action="store_true", help=FP32_HELP)
    overrides.add_argument("--balance-noise-levels", action="store_true",
                           help="weigh each patch's error by 1/its noise sigma: over a sigma range, trades some quality "
                                "at high noise for some at low noise (bench/README.md, \"Training on what users have\")")
    overrides.add_argument("--epochs", type=int, help="upper bound on epochs")
    overrides.add_argument("--max-minutes", type=float, help="wall-clock budget; the learning rate anneals to it")
    overrides.add_argument("--batch-size", type=int, help="patches per step and worker")
    overrides.add_argument("--patch-size", type=int, help="training crop size in pixels")
    overrides.add_argument("--learning-rate", type=float, help="Adam's peak learning rate")
    overrides.add_argument("--seed", type=int, help="seeds initialisation, patches and synthetic noise")
    overrides.add_argument("--keep-checkpoints", type=int, help="best N checkpoints by validation PSNR kept")
    p.add_argument("--run-name", help="reuse a name to resume that run from its latest checkpoint")
    p.add_argument("--self-supervised", action="store_true",
                   help="learn from noisy images alone (Neighbor2Neighbor): --data needs no target and no clean "
                        "images; --val-data without a target is scored reference-free (default: off)")
    add_degradation_flags(p, default_sigma=None)
    add_common_flags(p)

    p = command(commands, "evaluate", "PSNR/SSIM of a model on a paired dataset, or on clean data with noise added",
                "  resflow evaluate --model s3://resflow/models --data s3://resflow/set12 --noise-sigma 25\n"
                "  resflow evaluate --model ./model --data s3://resflow/set12-noisy25 --per-image\n"
                "  resflow evaluate --model s3://resflow/models --data s3://resflow/bsd68 --noise-sigma 15 25 50\n"
                "  resflow evaluate --model ./colour --data s3://resflow/cbsd68 s3://resflow/kodak24 --noise-sigma 15 25 50",
                run_evaluate)
    add_model_flag(p)
    p.add_argument("--data", required=True, nargs="+", help="paired dataset, or clean with --noise-sigma; several "
                                                             "give one table")
    p.add_argument("--noise-sigma", type=float, nargs="+", metavar="SIGMA",
                   help="clean data: the protocol's Gaussian noise at this sigma; several give a table (blind models)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the protocol seeds every image with 0")
    p.add_argument("--per-image", action="store_true", help="scores of every image, not only the means")
    add_common_flags(p, inference=True)

    p = command(commands, "restore", "restore every new or changed file of a Parquet dataset with Ray Data",
                "  resflow restore --input s3://resflow/incoming --output s3://resflow/restored --model s3://resflow/models\n"
                "  RAY_ADDRESS=http://head:8265 resflow restore ... --gpu --workers 8", run_restore)
    p.add_argument("--input", required=True, help="dataset to restore (never written to)")
    p.add_argument("--output", required=True, help="where restored files go, at the same relative paths")
    add_model_flag(p)
    p.add_argument("--workers", type=int, help="model replicas; default: one per 2 logical CPUs, or one per GPU")
    p.add_argument("--gpu", action="store_true", dest="use_gpu", help="one GPU per replica, bf16 unless --fp32")
    p.add_argument("--cpus-per-worker", type=float, default=RestoreJob.cpus_per_worker,
                   help="logical CPUs a CPU replica reserves (fractions leave Ray's own tasks room)")
    p.add_argument("--io-threads", type=int,
                   help="PNG decode/encode threads per replica; default: 1 on CPU, the node's CPUs per GPU on GPU")
    p.add_argument("--units-per-worker", type=int,
                   help="units of work each replica restores at once, one's storage round trips overlapping "
                        "another's work; default: 1 on CPU, 4 on GPU (more for a store far away)")
    p.add_argument("--skip-below", type=float, metavar="SIGMA", default=RestoreSettings.skip_below,
                   help="leave images whose estimated noise sigma (0-255 scale) is below this untouched (status "
                        "'skipped', input bytes kept); default: none, every image is restored. The estimate is "
                        "recorded either way (column noise_sigma)")
    p.add_argument("--force", action="store_true", help="restore every file, even those already done")
    p.add_argument("--prune", action="store_true",
                   help="remove the outputs, records and staged parts of input files deleted since an earlier run "
                        "(default: off, they are only reported)")
    p.add_argument("--retries", type=int, default=RestoreJob.retries,
                   help="rows that failed for a reason that can pass (a missing or unreadable image file, storage, "
                        "memory) are restored again by up to this many later runs, the file's other rows kept")
    p.add_argument("--stall-timeout", type=float, default=RestoreJob.stall_timeout_s, dest="stall_timeout_s",
                   help="fail after this many seconds without progress")
    p.add_argument("--wait-for-lease", type=float, default=RestoreJob.lease_wait_s, dest="lease_wait_s",
                   help="seconds to wait while another run writes the same output, before giving up")
    p.add_argument("--lease-ttl", type=float, default=RestoreJob.lease_ttl_s, dest="lease_ttl_s",
                   help="a crashed run's hold on the output is taken over this long after it stopped renewing it")
    p.add_argument("--no-lease", action="store_false", dest="lease",
                   help="run without the output's lease, for a store that ignores conditional writes (the run "
                        "refuses otherwise): then nothing keeps a second run from writing beside this one")
    p.add_argument("--executor", choices=EXECUTORS, default=RestoreJob.executor,
                   help="who runs the model: auto runs a small plan in this process and a large one (or one "
                        "with --gpu, --workers or RAY_ADDRESS) on Ray")
    p.add_argument("--unit-rows", type=int, default=RestoreJob.unit_rows,
                   help="rows per unit of work at most (whole row groups): smaller units spread a file over more replicas")
    add_common_flags(p, inference=True)

    p = command(commands, "models", "list a model registry's versions, show a model's card, promote a champion",
                "  resflow models list s3://resflow/models\n"
                "  resflow models show s3://resflow/models          # the champion's card\n"
                "  resflow models promote s3://resflow/models resnet-20261201-021500-3fa2c1", run_models)
    actions = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    listing = actions.add_parser("list", help="every version, the champion marked", formatter_class=Formatter)
    listing.add_argument("registry", help="model registry prefix")
    add_json_flag(listing)
    show = actions.add_parser("show", help="a model's card (architecture, metrics, training)", formatter_class=Formatter)
    show.add_argument("model", help="model folder, or registry (its champion)")
    add_json_flag(show)
    promote = actions.add_parser("promote", help="make a version the champion (what the nightly flow does)",
                                 formatter_class=Formatter)
    promote.add_argument("registry", help="model registry prefix")
    promote.add_argument("version", help="a version listed by `resflow models list`")
    promote.add_argument("--reason", default="promoted by hand", help="recorded in champion.json")
    add_json_flag(promote)


def build_parser(*extensions) -> Parser:
    """`extensions`: functions that add more subcommands (local/cli.py, flows/cli.py)."""
    parser = Parser(prog="resflow", description="Restore large image datasets with residual networks: Parquet in "
                                                "object storage, Ray Train, Ray Data, Prefect.",
                    epilog="`resflow COMMAND --help` explains each command, with examples.",
                    formatter_class=Formatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_commands(commands)
    for extend in extensions:
        extend(commands)
    return parser


def main(argv: list[str] | None = None, extensions=()) -> int:
    args = build_parser(*extensions).parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # one line, no traceback (RESFLOW_DEBUG=1 shows it)
        if os.environ.get("RESFLOW_DEBUG"):
            raise
        from pipeline.jobs import failure_kind

        kind = failure_kind(error)
        label = {"busy": "busy", "rejected": "error", "failed": "failed"}[kind]
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"resflow {args.command}: {label}: {message}", file=sys.stderr)
        return EXIT_STATUS[kind]


if __name__ == "__main__":
    sys.exit(main())
