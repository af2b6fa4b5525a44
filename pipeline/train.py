"""Training a residual restoration network with Ray Train (DDP over N workers).

    # laptop: local Ray, 2 CPU workers, data in the local S3 server
    resflow train --data s3://resflow/train400/train --val-data s3://resflow/train400/val \
        --output s3://resflow/models --preset cpu --workers 2 --max-minutes 30
    # cluster: RAY_ADDRESS=http://head:8265 (or ray://...), one GPU per worker
    resflow train ... --preset dncnn-paper --workers 8 --gpu

Data: a Parquet image dataset, clean (degradations are synthesised on the fly from a
seeded stream that differs per worker and epoch) or paired (`image` degraded, `target`
clean). Ray Data streams it into the workers through `ray.train.get_dataset_shard`.

Batch scaling: `batch_size` is per worker, so the global batch is workers x batch_size;
the learning rate is scaled by sqrt(workers), Adam's usual rule for a larger batch.

Every epoch: validation PSNR/SSIM on whole images (the quality protocol), and a
checkpoint (safetensors weights, model.json, optimizer state in safetensors,
train_state.json) reported through `ray.train.report` into the run's storage path in
object storage; the best `keep_checkpoints` by validation PSNR are kept. A rerun with the
same run name resumes from the latest checkpoint; FailureConfig restarts a crashed
worker group from it too. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.dataset import check_dataset, inspect_dataset
from pipeline.degrade import Degradation
from pipeline.images import (
    DecodeLimits,
    ImageColumns,
    decode,
    from_float,
    to_float,
    validate_schema,
)
from pipeline.metrics import psnr, ssim
from pipeline.models import build_model

TRAIN_STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    model: str = "dncnn"  # a name in pipeline.models.MODELS
    model_config: dict = field(default_factory=lambda: {"depth": 10, "width": 32})  # fields of its config class
    degradation: Degradation = Degradation(noise_sigma=25)  # synthesised on clean data; ignored for paired data
    patch_size: int = 40  # the DnCNN paper's 40 x 40 for sigma 25
    patches_per_image: int = 16  # random crops per image per epoch, each with a random flip/rotation
    batch_size: int = 64  # per worker; the global batch is workers x batch_size
    epochs: int = 50  # upper bound; max_minutes may end training sooner
    max_minutes: float | None = None  # wall-clock budget; the LR schedule anneals to it
    learning_rate: float = 1e-3  # Adam, for the global batch of one worker (scaled by sqrt(workers))
    min_learning_rate: float = 1e-5  # cosine schedule floor
    grad_clip: float = 0.5  # max gradient norm; keeps early Adam steps on BN-free nets stable
    keep_checkpoints: int = 3  # best N by validation PSNR stay in storage
    workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker, bf16 autocast
    cpus_per_worker: float = 1.0  # logical CPUs each worker reserves (fractions keep 2-core machines alive)
    threads_per_worker: int | None = None  # torch threads; None: physical cores / workers on CPU
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before the run fails
    seed: int = 0  # seeds init, patch sampling and the synthetic degradations
    val_seed: int = 0  # the protocol seeds every validation image's noise with 0
    columns: ImageColumns = ImageColumns()

    def __post_init__(self):
        checks = [
            (self.patch_size >= 8, f"patch_size must be >= 8, got {self.patch_size}"),
            (self.patches_per_image >= 1, "patches_per_image must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes must be positive"),
            (0 < self.min_learning_rate <= self.learning_rate, "need 0 < min_learning_rate <= learning_rate"),
            (self.workers >= 1, "workers must be >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.cpus_per_worker > 0, "cpus_per_worker must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")
        build_model(self.model, **self.model_config)  # fails early, naming the bad field

    def to_dict(self) -> dict:
        data = asdict(self)
        data["degradation"] = self.degradation.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        data["degradation"] = Degradation.from_dict(data["degradation"])
        data["columns"] = ImageColumns(**data["columns"])
        return cls(**data)


# --- presets (STYLE.md 4: functions, derived with replace) -----------------------------------


def tiny() -> TrainConfig:
    """Tests: trains in seconds, learns enough to beat the noisy input."""
    return TrainConfig(model="resnet", model_config={"blocks": 2, "width": 16, "unshuffle": 2}, patch_size=32,
                       patches_per_image=64, batch_size=32, epochs=3, learning_rate=2e-3)


def cpu() -> TrainConfig:
    """Two CPU cores, about 30 minutes: a residual-block network at half resolution
    (pixel-unshuffle) sees a 2x wider receptive field for a quarter of the work per pixel."""
    return TrainConfig(model="resnet", model_config={"blocks": 6, "width": 48, "unshuffle": 2}, patch_size=48,
                       patches_per_image=32, batch_size=32, epochs=400, max_minutes=30, learning_rate=1e-3)


def dncnn_cpu() -> TrainConfig:
    """DnCNN 10 x 32 on CPU: the paper's architecture, shallower."""
    return TrainConfig(model="dncnn", model_config={"depth": 10, "width": 32}, epochs=400, max_minutes=30)


def dncnn_paper() -> TrainConfig:
    """DnCNN-S (Zhang et al. 2017, sigma 25): 17 x 64 with BN, 40 x 40 patches, batch 128,
    Adam 1e-3 decaying to 1e-4 over 50 epochs; for GPU workers."""
    return TrainConfig(model="dncnn", model_config={"depth": 17, "width": 64, "batch_norm": True}, patch_size=40,
                       patches_per_image=128, batch_size=128, epochs=50, learning_rate=1e-3, min_learning_rate=1e-4,
                       use_gpu=True)


TRAIN_PRESETS = {"tiny": tiny, "cpu": cpu, "dncnn-cpu": dncnn_cpu, "dncnn-paper": dncnn_paper}


def train_preset(name: str, **overrides) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
    return replace(TRAIN_PRESETS[name](), **{k: v for k, v in overrides.items() if v is not None})


# --- patches ---------------------------------------------------------------------------------


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of an (H, W, C) array."""
    out = np.rot90(array, k % 4, axes=(0, 1))
    return out[:, ::-1] if k >= 4 else out


def image_float(value, channels: int, limits: DecodeLimits) -> np.ndarray | None:
    decoded = decode(value, limits)
    if not decoded.ok:
        return None
    image, _ = to_float(decoded.pixels, decoded.mode)
    if channels == 1 and image.shape[2] == 3:
        image = (image @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None]  # ITU-R 601 luma
    elif channels != image.shape[2]:
        return None
    return image


def sample_patches(batch: dict, config: TrainConfig, channels: int, paired: bool, rng: np.random.Generator,
                   noise_rng: np.random.RandomState, limits: DecodeLimits) -> list[tuple[np.ndarray, np.ndarray]]:
    """(degraded, clean) patch pairs, (C, P, P) float32, from one Ray Data batch of rows."""
    pairs = []
    size = config.patch_size
    columns = config.columns
    for row in range(len(batch[columns.image])):
        clean = image_float(batch[columns.target if paired else columns.image][row], channels, limits)
        degraded = image_float(batch[columns.image][row], channels, limits) if paired else None
        if clean is None or (paired and (degraded is None or degraded.shape != clean.shape)):
            continue  # a bad training image is skipped; the step count is synchronised across ranks
        height, width = clean.shape[:2]
        if height < size or width < size:
            continue
        for _ in range(config.patches_per_image):
            y, x = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
            k = int(rng.integers(0, 8))
            target = dihedral(clean[y : y + size, x : x + size], k)
            if paired:
                source = dihedral(degraded[y : y + size, x : x + size], k)
            else:
                source = config.degradation.apply(np.ascontiguousarray(target), noise_rng)
            pairs.append((np.ascontiguousarray(source.transpose(2, 0, 1)),
                          np.ascontiguousarray(target.transpose(2, 0, 1))))
    return pairs


# --- checkpoints (no pickle: safetensors + JSON) -------------------------------------------------


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(directory: str, model: torch.nn.Module, optimizer, train_state: dict, config: TrainConfig,
                     metrics: dict) -> None:
    from safetensors.torch import save_file

    from pipeline.modelio import save_model

    save_model(directory, model, degradation=config.degradation.to_dict(), metrics=metrics,
               training={"config": config.to_dict(), "epoch": train_state["epoch"]})
    tensors, meta = optimizer_to_tensors(optimizer)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, OPTIMIZER_FILE))
    Path(directory, TRAIN_STATE_FILE).write_text(json.dumps({**train_state, "optimizer_meta": meta}))


def read_checkpoint(directory: str, model: torch.nn.Module, optimizer) -> dict:
    from safetensors.torch import load_file

    from pipeline.modelio import load_model

    loaded, _ = load_model(directory)
    model.load_state_dict(loaded.state_dict())
    train_state = json.loads(Path(directory, TRAIN_STATE_FILE).read_text())
    optimizer_from_tensors(optimizer, load_file(os.path.join(directory, OPTIMIZER_FILE)), train_state.pop("optimizer_meta"))
    return train_state


# --- the per-worker loop ------------------------------------------------------------------------


def learning_rate_at(progress: float, config: TrainConfig, workers: int) -> float:
    top = config.learning_rate * math.sqrt(workers)
    low = config.min_learning_rate * math.sqrt(workers)
    return low + 0.5 * (top - low) * (1 + math.cos(math.pi * min(1.0, progress)))


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return tensor.tolist()


def validate(model: torch.nn.Module, shard, config: TrainConfig, channels: int, paired: bool, device) -> dict:
    """Whole-image PSNR/SSIM under the quality protocol; sums are reduced across ranks."""
    from pipeline.restore_core import ModelRunner, RestoreSettings

    runner = ModelRunner(model, RestoreSettings(tile=512, tile_overlap=64, batch_size=1, device=str(device)))
    limits = DecodeLimits()
    totals = [0.0, 0.0, 0.0, 0.0]  # psnr, ssim, noisy psnr, count
    columns = config.columns
    for batch in shard.iter_batches(batch_size=4, batch_format="numpy"):
        for row in range(len(batch[columns.image])):
            clean = image_float(batch[columns.target if paired else columns.image][row], channels, limits)
            if clean is None:
                continue
            if paired:
                noisy = image_float(batch[columns.image][row], channels, limits)
            else:
                noisy = config.degradation.apply(clean, np.random.RandomState(config.val_seed))
            restored = runner.run([np.ascontiguousarray(noisy.transpose(2, 0, 1))])[0].transpose(1, 2, 0)
            reference = from_float(clean, "L" if channels == 1 else "RGB")
            out = from_float(restored, "L" if channels == 1 else "RGB")
            totals[0] += psnr(reference, out)
            totals[1] += ssim(reference, out)
            totals[2] += psnr(reference, from_float(noisy, "L" if channels == 1 else "RGB"))
            totals[3] += 1
    totals = _all_reduce(totals)
    count = max(totals[3], 1)
    return {"val_psnr": totals[0] / count, "val_ssim": totals[1] / count, "val_noisy_psnr": totals[2] / count,
            "val_images": int(totals[3])}


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(loop_config["train"])
    paired = loop_config["paired"]
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    threads = config.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    if not config.use_gpu:
        torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # same initial weights on every rank
    model = build_model(config.model, **config.model_config)
    channels = model.config.channels
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    train_state = {"epoch": 0, "elapsed_s": 0.0, "resumed_from": None, "restarts": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            train_state = read_checkpoint(directory, model, optimizer)
        train_state["resumed_from"] = train_state["epoch"]
        train_state["restarts"] = train_state.get("restarts", 0) + 1
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {train_state['epoch']}", flush=True)
    model = model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    for state in optimizer.state.values():  # optimizer tensors follow the model's device
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    network = model.module if hasattr(model, "module") else model
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    limits = DecodeLimits()
    budget_s = config.max_minutes * 60 if config.max_minutes else None
    session_start = time.time() - train_state["elapsed_s"]
    use_bf16 = config.use_gpu and device.type == "cuda"
    epoch_seconds: list[float] = []
    crash_at = loop_config.get("crash_at_epoch") or -1  # fault injection: a real worker death, for tests and drills
    crash_marker = loop_config.get("crash_marker", "")

    for epoch in range(train_state["epoch"] + 1, config.epochs + 1):
        elapsed = _all_reduce([time.time() - session_start], "max")[0]
        expected_epoch = float(np.mean(epoch_seconds)) if epoch_seconds else 0.0
        if budget_s and elapsed + expected_epoch > budget_s:
            break  # the next epoch would overrun the budget: stop inside it
        progress = max((epoch - 1) / config.epochs, elapsed / budget_s if budget_s else 0.0)
        lr = learning_rate_at(progress, config, workers)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_start = time.time()
        rng = np.random.default_rng([config.seed, epoch, rank])
        noise_rng = np.random.RandomState((config.seed * 1_000_003 + epoch * 1009 + rank) % 2**32)
        model.train()
        buffer: list = []
        losses, samples = [], 0
        exhausted = False
        iterator = iter(train_shard.iter_batches(batch_size=8, batch_format="numpy", local_shuffle_buffer_size=64))
        while True:
            while len(buffer) < config.batch_size and not exhausted:
                try:
                    buffer.extend(sample_patches(next(iterator), config, channels, paired, rng, noise_rng, limits))
                except StopIteration:
                    exhausted = True
            have = 1.0 if len(buffer) >= config.batch_size else 0.0
            if _all_reduce([have], "min")[0] < 1:  # every rank steps together, or none does (DDP)
                break
            picks = rng.permutation(len(buffer))[: config.batch_size]
            chosen = [buffer[i] for i in picks]
            keep = set(picks.tolist())
            buffer = [pair for i, pair in enumerate(buffer) if i not in keep]
            source = torch.from_numpy(np.stack([pair[0] for pair in chosen])).to(device)
            target = torch.from_numpy(np.stack([pair[1] for pair in chosen])).to(device)
            if device.type == "cpu":
                source = source.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
                output = model(source)
            loss = F.mse_loss(output.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            samples += len(chosen)
            if epoch == crash_at and rank == workers - 1 and len(losses) == 3 and not storage.exists(crash_marker):
                storage.write_bytes(crash_marker, b"injected")  # once per run: the restarted group must get past it
                print(f"fault injection: worker {rank} exits in the middle of epoch {epoch}", flush=True)
                os._exit(1)
        for _ in iterator:  # drain, so that the streaming split can start the next epoch
            pass
        train_seconds = time.time() - epoch_start
        model.eval()
        metrics = validate(network, val_shard, config, channels, paired, device)
        network.train()
        loss_sum, sample_sum, worst_seconds = _all_reduce([float(np.sum(losses)), float(samples), train_seconds])
        steps = max(1, _all_reduce([float(len(losses))])[0])
        elapsed = time.time() - session_start
        train_state.update({"epoch": epoch, "elapsed_s": elapsed})
        metrics.update({"epoch": epoch, "loss": loss_sum / steps, "lr": lr, "patches_per_s": sample_sum / max(train_seconds, 1e-9),
                        "elapsed_s": elapsed, "resumed_from": train_state["resumed_from"] or 0,
                        "restarts": train_state["restarts"]})
        _report(metrics, network, optimizer, train_state, config, rank)
        epoch_seconds.append(time.time() - epoch_start)
        if rank == 0:
            left = (config.epochs - epoch) * float(np.mean(epoch_seconds))
            if budget_s:
                left = min(left, max(0.0, budget_s - elapsed))
            print(f"epoch {epoch}/{config.epochs}  loss {metrics['loss']:.5f}  val PSNR {metrics['val_psnr']:.2f} dB "
                  f"(noisy {metrics['val_noisy_psnr']:.2f})  SSIM {metrics['val_ssim']:.4f}  "
                  f"{metrics['patches_per_s']:.0f} patches/s  lr {lr:.2e}  elapsed {_clock(elapsed)}  left ~{_clock(left)}",
                  flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _report(metrics: dict, network, optimizer, train_state: dict, config: TrainConfig, rank: int) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="resflow-ckpt-") as directory:
        write_checkpoint(directory, network, optimizer, train_state, config, metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


# --- the driver -------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model_uri: str
    version: str
    metrics: dict
    run_name: str
    checkpoint_uri: str
    history: list
    restarts: int = 0  # worker-group restarts from a checkpoint during this run (node loss, crashes)
    resumed_from: int = 0  # the epoch whose checkpoint the last restart resumed from

    def summary(self) -> dict:
        """What `resflow train --json` prints and orchestrators record."""
        return {"model": self.model_uri, "version": self.version, "run_name": self.run_name,
                "checkpoints": self.checkpoint_uri, **self.metrics, "restarts": self.restarts,
                "resumed_from": self.resumed_from}


def data_fingerprint(files: list[storage.FileInfo], degradation: Degradation) -> str:
    digest = hashlib.sha256()
    for info in files:
        digest.update(f"{storage.parse(info.uri).name}|{info.size}|{info.etag}\n".encode())
    digest.update(json.dumps(degradation.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def read_image_dataset(files: list[storage.FileInfo], columns: list[str]):
    import ray.data

    filesystem, _ = storage.pyarrow_filesystem(files[0].uri)
    paths = [storage.parse(info.uri).path for info in files]
    return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns)


def train(data: str, val_data: str, output: str, config: TrainConfig, run_name: str | None = None,
          storage_path: str | None = None, crash_at_epoch: int | None = None) -> TrainResult:
    """Train on `data`, validate on `val_data` every epoch, publish the best checkpoint as a
    model version under the registry `output`. `crash_at_epoch` makes the last worker exit
    at that epoch of the first attempt (fault-tolerance drills)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import raycluster, registry
    from pipeline.modelio import load_model, save_model

    columns = config.columns
    inspected = inspect_dataset(data, columns)  # lists the files and reads each footer once
    paired = columns.target in inspected[0][1].schema.to_arrow_schema().names
    if paired:  # then every file must carry the target
        for info, footer in inspected:
            validate_schema(footer.schema.to_arrow_schema(), columns, need_target=True, where=info.uri)
    train_files = [info for info, _ in inspected]
    val_files = check_dataset(val_data, columns, need_target=paired)
    fingerprint = data_fingerprint(train_files, config.degradation)
    run_name = run_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}-{fingerprint[:6]}"
    storage_path = storage_path or storage.join(output, "_runs")
    storage.ensure_bucket(storage_path)
    raycluster.connect()
    wanted = [columns.id, columns.image] + ([columns.target] if paired else [])
    datasets = {"train": read_image_dataset(train_files, wanted), "val": read_image_dataset(val_files, wanted)}
    run_filesystem, run_path = storage.pyarrow_filesystem(storage_path)
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": config.to_dict(), "paired": paired, "crash_at_epoch": crash_at_epoch,
                           "crash_marker": storage.join(storage_path, run_name, "_fault_injected")},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=run_path, storage_filesystem=run_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints,
                                                         checkpoint_score_attribute="val_psnr",
                                                         checkpoint_score_order="max"),
        ),
        datasets=datasets,
    )
    print(f"training run {run_name!r}: {len(train_files)} train file(s), {len(val_files)} val file(s), "
          f"{'paired' if paired else 'clean + ' + config.degradation.describe()}, {config.workers} worker(s) "
          f"{'GPU' if config.use_gpu else 'CPU'}; checkpoints in {storage.join(storage_path, run_name)}", flush=True)
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training run {run_name} failed: {result.error}")
    candidates = result.best_checkpoints or ([(result.checkpoint, result.metrics)] if result.checkpoint else [])
    if not candidates:
        raise RuntimeError(f"training run {run_name} produced no checkpoint (no epoch finished?)")
    best_checkpoint, best_metrics = max(candidates, key=lambda item: item[1].get("val_psnr", float("-inf")))
    with best_checkpoint.as_directory() as directory:
        model, card = load_model(directory)
        train_state = json.loads(Path(directory, TRAIN_STATE_FILE).read_text())
    history = _history(result)
    metrics = {key: best_metrics[key] for key in ("val_psnr", "val_ssim", "val_noisy_psnr", "epoch", "loss") if key in best_metrics}
    version = f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}-{fingerprint[:6]}"
    published = save_model(
        registry.version_uri(output, version), model, version=version, degradation=config.degradation.to_dict(),
        data_fingerprint=fingerprint, metrics=metrics,
        training={"config": config.to_dict(), "run_name": run_name, "paired": paired, "epochs_run": train_state["epoch"],
                  "wall_seconds": train_state["elapsed_s"], "train_data": data, "val_data": val_data},
    )
    final = result.metrics or {}
    return TrainResult(registry.version_uri(output, version), published.version, metrics, run_name,
                       storage.join(storage_path, run_name), history, int(final.get("restarts", 0)),
                       int(final.get("resumed_from", 0)))


def _history(result) -> list:
    try:
        frame = result.metrics_dataframe
        return frame.to_dict("records") if frame is not None else []
    except Exception:
        return []
