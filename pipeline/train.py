"""Training a residual restoration network with Ray Train (DDP over N workers).

    # laptop: local Ray, 2 CPU workers, data in the local S3 server
    resflow train --data s3://resflow/train400/train --val-data s3://resflow/train400/val \
        --registry s3://resflow/models --preset cpu --workers 2 --max-minutes 30
    # cluster: RAY_ADDRESS=http://head:8265 (or ray://...), one GPU per worker
    resflow train ... --preset dncnn-paper --workers 8 --gpu

Data: a Parquet image dataset of one of three kinds, decided from its own columns
(`pipeline/dataset.py`, `inspect`): paired (`image` degraded, `target` clean), clean (degradations are
synthesised on the fly from a seeded stream that differs per worker and epoch), or
noisy-only (self-supervised training: `image` is taken as already noisy and nothing is
added). The validation set's kind is decided the same way, from its columns, so a paired
validation set is scored as pairs whatever the training set is. Ray Data streams the data
into the workers through `ray.train.get_dataset_shard`.

Self-supervised (`TrainConfig.self_supervised`): Neighbor2Neighbor (Huang et al., CVPR
2021). Two half-size images are sub-sampled from one noisy patch, a random pixel of every
2x2 cell and one of its neighbours; their noise is independent and their signal nearly the
same, so the network learns to map one to the other, with the paper's regulariser (weight
ramped to 2) tying that to the full-size output. Validation without references scores
whole held-out images by Stein's unbiased risk estimate of their error against the clean
images (`val_sure_psnr`, with each image's noise sigma estimated), which picks the
checkpoint, and reports `val_n2n_psnr` (f(g1(y)) against g2(y): the clean error plus the
noise, capped by the noise, too flat to choose by).

Batch scaling: `batch_size` is per worker, so the global batch is workers x batch_size;
the learning rate is scaled by sqrt(workers), Adam's usual rule for a larger batch.

Every epoch: validation PSNR/SSIM on whole images (the quality protocol), every epoch's
metrics appended to `epochs.json` in the run's folder (what charts draw), and a
checkpoint (safetensors weights, model.json, optimizer state in safetensors,
train_state.json) reported through `ray.train.report` into the run's storage path in
object storage; the best `keep_checkpoints` by validation score are kept. A rerun with the
same run name resumes from the latest checkpoint; FailureConfig restarts a crashed
worker group from it too. Nothing here unpickles.

The per-worker loop reads top to bottom: `setup_worker`, `resume`, then per epoch
`train_one_epoch`, `validate` and `report_epoch`. Tests inject faults through
`TrainHooks`, which production leaves empty.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.config import TrainConfig, from_data, to_data
from pipeline.contract import DecodeLimits
from pipeline.dataset import CLEAN, NOISY, PAIRED, InspectedDataset, inspect
from pipeline.degradations import Degradation, degradation_seed
from pipeline.images import decode, to_float
from pipeline.jobs import Events, TrainJob
from pipeline.metrics import sure_mse
from pipeline.models import build_model, takes_noise_level
from pipeline.noise import estimate_sigma

TRAIN_STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


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
    elif channels == 3 and image.shape[2] == 1:  # a gray image in colour data: the colour image it is
        image = np.repeat(image, 3, axis=2)
    elif channels != image.shape[2]:
        return None
    return image


class Patch(NamedTuple):
    source: np.ndarray  # (C, P, P) float32: what the network sees
    target: np.ndarray  # (C, P, P) float32: what it should return
    noise_level: float  # the noise sigma added, / 255 (what a noise-map model is told); NaN when unknown


def sample_patches(batch: dict, config: TrainConfig, channels: int, kind: str, rng: np.random.Generator,
                   noise_rng: np.random.RandomState, limits: DecodeLimits) -> list[Patch]:
    """Patches from one Ray Data batch of rows: (degraded, clean) for paired and clean
    data, (noisy, the same noisy) for noisy-only data, which the self-supervised loss
    sub-samples itself. A degradation with a sigma range draws its sigma per patch; only
    noise synthesised here has a known level."""
    patches = []
    size = config.data.patch_size
    columns = config.data.columns
    paired = kind == PAIRED
    for row in range(len(batch[columns.image])):
        clean = image_float(batch[columns.target if paired else columns.image][row], channels, limits)
        degraded = image_float(batch[columns.image][row], channels, limits) if paired else None
        if clean is None or (paired and (degraded is None or degraded.shape != clean.shape)):
            continue  # a bad training image is skipped; the step count is synchronised across ranks
        height, width = clean.shape[:2]
        if height < size or width < size:
            continue
        for _ in range(config.data.patches_per_image):
            y, x = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
            k = int(rng.integers(0, 8))
            target = dihedral(clean[y : y + size, x : x + size], k)
            sigma = math.nan
            if paired:
                source = dihedral(degraded[y : y + size, x : x + size], k)
            elif kind == NOISY:
                source = target
            else:
                source, sigma = config.data.degradation.apply_drawn(np.ascontiguousarray(target), noise_rng)
            patches.append(Patch(np.ascontiguousarray(source.transpose(2, 0, 1)),
                                 np.ascontiguousarray(target.transpose(2, 0, 1)), sigma / 255.0))
    return patches


BALANCE_FLOOR = 5 / 255  # noise below sigma 5 weighs as sigma 5: near-clean patches would take every step
BALANCE_REFERENCE = 25 / 255  # the sigma whose patches weigh 1: one constant, so no batch or rank reweighs another's


def balanced_mse(output: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The mean of each patch's squared error times BALANCE_REFERENCE / the RMS of what the
    degradation added (its noise, for a noise-only degradation; floored at BALANCE_FLOOR).
    A denoiser's MSE grows about linearly with sigma, so over sigma 0-55 half of plain MSE
    comes from patches above 40 and under a tenth from those below 15. Over 1/sigma it is, to
    first order, the patches' mean PSNR: every noise level counts alike."""
    error = (output - target).pow(2).flatten(1).mean(1)
    added = (source - target).pow(2).flatten(1).mean(1).sqrt().clamp_min(BALANCE_FLOOR)
    return (error * (BALANCE_REFERENCE / added)).mean()


def supervised_loss(config: TrainConfig, output: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """MSE against the clean target, noise-balanced when the config asks."""
    if config.data.balance_noise_levels:
        return balanced_mse(output, target, source)
    return F.mse_loss(output, target)


# --- Neighbor2Neighbor ---------------------------------------------------------------------------

# Each 2x2 cell's pixels in pixel_unshuffle order (0,0) (0,1) (1,0) (1,1); the two that share
# a side with each (the paper's neighbours).
_NEIGHBOURS = torch.tensor([[1, 2], [0, 3], [0, 3], [1, 2]])
N2N_REGULARISER = 2.0  # the paper's gamma for Gaussian noise, ramped up from 0 over the run


def neighbour_masks(shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 2x2 cell of an (N, C, H, W) batch: a random pixel and one of its neighbours, as
    indices into the cell (shared by every channel)."""
    n, _, h, w = shape
    first = torch.randint(0, 4, (n, 1, 1, h // 2, w // 2), generator=generator)
    second = _NEIGHBOURS[first, torch.randint(0, 2, first.shape, generator=generator)]
    return first, second


def neighbour_subsample(images: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two half-size sub-images g1(y), g2(y) that `masks` pick."""
    n, c, h, w = images.shape
    cells = F.pixel_unshuffle(images, 2).view(n, c, 4, h // 2, w // 2)
    first, second = (mask.to(images.device).expand(n, c, 1, h // 2, w // 2) for mask in masks)
    return cells.gather(2, first).squeeze(2), cells.gather(2, second).squeeze(2)


def neighbor2neighbor_loss(model: torch.nn.Module, network: torch.nn.Module, noisy: torch.Tensor, gamma: float,
                           generator: torch.Generator, bf16: bool) -> torch.Tensor:
    """||f(g1 y) - g2 y||^2 + gamma ||f(g1 y) - g2 y - (g1 f(y) - g2 f(y))||^2, f(y) without gradient."""
    masks = neighbour_masks(tuple(noisy.shape), generator)
    first, second = neighbour_subsample(noisy, masks)
    with torch.autocast(device_type=noisy.device.type, dtype=torch.bfloat16, enabled=bf16):
        output = model(first.contiguous(memory_format=torch.channels_last) if noisy.device.type == "cpu" else first)
    # A region of its own: autocast caches bf16 weight copies per region, and copies made
    # under no_grad would carry no gradient into the pass above if the order ever changed.
    with torch.no_grad(), torch.autocast(device_type=noisy.device.type, dtype=torch.bfloat16, enabled=bf16):
        full = network(noisy)
    full_first, full_second = neighbour_subsample(full.float(), masks)
    difference = output.float() - second
    return F.mse_loss(difference, torch.zeros_like(difference)) + gamma * F.mse_loss(difference, full_first - full_second)


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

    save_model(directory, model, degradation=to_data(config.data.degradation), metrics=metrics,
               training={"config": to_data(config), "epoch": train_state["epoch"]})
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


@dataclass
class TrainHooks:
    """Where tests reach into the loop (fault injection); production passes none."""

    after_step: Callable[[int, int, int, int], None] | None = None  # (epoch, step, rank, world size)
    before_validation: Callable[[int, torch.nn.Module], None] | None = None  # (epoch, the plain network)


@dataclass
class Worker:
    """One rank's model, optimizer and progress."""

    config: TrainConfig
    model: torch.nn.Module  # what trains (DDP-wrapped with several workers)
    network: torch.nn.Module  # the plain network inside it: what is validated and saved
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int
    world: int
    state: dict = field(default_factory=lambda: {"epoch": 0, "elapsed_s": 0.0, "resumed_from": None, "restarts": 0})
    session_start: float = 0.0  # time.time() at which this run's training clock reads 0
    steps_per_epoch: float = 1.0  # expected, from the row count: moves the schedule within an epoch
    step: int = 0  # steps taken in this epoch

    def progress(self, epoch: int) -> float:
        """How far through the schedule: the budget's elapsed share when there is a budget
        (checked every step, so warmup and annealing are smooth), else by epochs."""
        progress = (epoch - 1 + min(1.0, self.step / self.steps_per_epoch)) / self.config.optimiser.epochs
        if self.config.optimiser.max_minutes:
            progress = max(progress, (time.time() - self.session_start) / (self.config.optimiser.max_minutes * 60))
        return min(progress, 1.0)

    def set_learning_rate(self, epoch: int) -> float:
        """The schedule's rate now (`progress`)."""
        rate = learning_rate_at(self.progress(epoch), self.config, self.world)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        return rate

    @property
    def channels(self) -> int:
        return self.network.config.channels

    @property
    def takes_noise_level(self) -> bool:
        return takes_noise_level(self.network)

    @property
    def use_bf16(self) -> bool:
        from pipeline.inference import native_bf16

        return self.config.scaling.bf16 and native_bf16(str(self.device))


def learning_rate_at(progress: float, config: TrainConfig, workers: int) -> float:
    """Linear warmup over `config.optimiser.warmup` of the schedule, then cosine to the floor."""
    top = config.optimiser.learning_rate * math.sqrt(workers)
    low = config.optimiser.min_learning_rate * math.sqrt(workers)
    if progress < config.optimiser.warmup:
        return low + (top - low) * progress / config.optimiser.warmup
    annealed = (progress - config.optimiser.warmup) / (1 - config.optimiser.warmup)
    return low + 0.5 * (top - low) * (1 + math.cos(math.pi * min(1.0, annealed)))


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return tensor.tolist()


def setup_worker(config: TrainConfig) -> Worker:
    """This rank's network (the same initial weights on every rank), optimizer and device."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not config.scaling.use_gpu:
        torch.set_num_threads(config.scaling.threads_per_worker or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(config.seed)
    network = build_model(config.model.architecture, **config.model.architecture_config)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.optimiser.learning_rate)
    return Worker(config, network, network, optimizer, ray.train.torch.get_device(), rank, world)


def resume(worker: Worker) -> None:
    """Load the latest checkpoint when there is one (a rerun, or a restart after a crash),
    then move everything to the device and wrap the model for DDP."""
    import ray.train
    import ray.train.torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            worker.state = read_checkpoint(directory, worker.network, worker.optimizer)
        worker.state["resumed_from"] = worker.state["epoch"]
        worker.state["restarts"] = worker.state.get("restarts", 0) + 1
        if worker.rank == 0:
            print(f"resuming from the checkpoint of epoch {worker.state['epoch']}", file=sys.stderr, flush=True)
    network = worker.network.to(worker.device)
    if worker.device.type == "cpu":
        network = network.to(memory_format=torch.channels_last)
    for state in worker.optimizer.state.values():  # optimizer tensors follow the model's device
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(worker.device)
    worker.model = ray.train.torch.prepare_model(network, move_to_device=False)
    worker.network = worker.model.module if hasattr(worker.model, "module") else worker.model


def patch_batch(patches: list[Patch], device: torch.device, with_levels: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """One step's (source, target) batch, and the model's extra arguments: the patches'
    noise levels for a noise-map model, none otherwise."""
    source = torch.from_numpy(np.stack([patch.source for patch in patches])).to(device)
    target = torch.from_numpy(np.stack([patch.target for patch in patches])).to(device)
    if device.type == "cpu":
        source = source.contiguous(memory_format=torch.channels_last)
    levels = (torch.tensor([patch.noise_level for patch in patches], device=device),) if with_levels else ()
    return source, target, levels


def train_one_epoch(worker: Worker, shard, epoch: int, kind: str, hooks: TrainHooks) -> tuple[list[float], int]:
    """One pass over this rank's shard; returns the step losses and the patches seen. Every
    rank steps together or none does (DDP), so a rank that runs out of patches first ends
    the epoch for all."""
    config, device = worker.config, worker.device
    rng = np.random.default_rng([config.seed, epoch, worker.rank])
    noise_rng = np.random.RandomState((config.seed * 1_000_003 + epoch * 1009 + worker.rank) % 2**32)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 1009 + worker.rank)
    limits = DecodeLimits()
    worker.model.train()
    buffer: list = []
    losses, samples, exhausted = [], 0, False
    batches = iter(shard.iter_batches(batch_size=8, batch_format="numpy", local_shuffle_buffer_size=64))
    worker.step = 0
    while True:
        worker.set_learning_rate(epoch)
        while len(buffer) < config.data.batch_size and not exhausted:
            try:
                buffer.extend(sample_patches(next(batches), config, worker.channels, kind, rng, noise_rng, limits))
            except StopIteration:
                exhausted = True
        if _all_reduce([1.0 if len(buffer) >= config.data.batch_size else 0.0], "min")[0] < 1:
            break
        picks = rng.permutation(len(buffer))[: config.data.batch_size]
        chosen, keep = [buffer[i] for i in picks], set(picks.tolist())
        buffer = [patch for i, patch in enumerate(buffer) if i not in keep]
        source, target, levels = patch_batch(chosen, device, worker.takes_noise_level)
        if config.data.self_supervised:
            gamma = N2N_REGULARISER * worker.progress(epoch)
            loss = neighbor2neighbor_loss(worker.model, worker.network, source, gamma, generator, worker.use_bf16)
        else:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=worker.use_bf16):
                output = worker.model(source, *levels)
            loss = supervised_loss(config, output.float(), target, source)
        worker.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(worker.model.parameters(), config.optimiser.grad_clip)
        worker.optimizer.step()
        losses.append(loss.item())
        samples += len(chosen)
        worker.step += 1
        if hooks.after_step:
            hooks.after_step(epoch, len(losses), worker.rank, worker.world)
    for _ in batches:  # drain, so that the streaming split can start the next epoch
        pass
    return losses, samples


def validate(worker: Worker, shard, kind: str) -> dict:
    """Score the validation shard by what it holds, the sums reduced across ranks: with
    references (paired, or clean with the degradation synthesised at the validation seed)
    whole-image PSNR/SSIM under the quality protocol (evaluate.restore_and_score);
    noisy-only, the reference-free `val_sure_psnr` and `val_n2n_psnr`. `val_score`, the one
    that picks checkpoints, is PSNR here; without references the loop makes it from SURE's
    estimates (`sure_score`), or, where no image could be scored so, the epoch: the latest."""
    from pipeline.config import RestoreSettings
    from pipeline.inference import ModelRunner

    worker.network.eval()
    runner = ModelRunner(worker.network, RestoreSettings(batch_size=1, device=str(worker.device), bf16=worker.config.scaling.bf16))
    try:
        if kind == NOISY:
            metrics = _validate_without_references(worker, shard, runner)
        else:
            metrics = _validate_with_references(worker, shard, runner, kind == PAIRED)
            metrics["val_score"] = metrics["val_psnr"]
    finally:
        worker.network.train()
    return metrics


def _validate_without_references(worker: Worker, shard, runner) -> dict:
    """Two reference-free scores on whole held-out noisy images.

    `val_sure_psnr` picks checkpoints: the error against the unseen clean images by Stein's
    unbiased risk estimate (metrics.sure_mse; the probe seeded alike every epoch), with each
    image's noise sigma estimated (pipeline/noise.py), as the PSNR of the mean error. An
    estimate off by d in sigma^2 shifts it by d (2 div/n - 1), nearly alike for every epoch:
    its level is off, its changes follow the true error's (bench/README.md, "Picking a
    checkpoint without references"). It assumes independent noise per value: a gray image
    in colour data (three equal channels) is left out.

    `val_n2n_psnr`: f(g1(y)) against g2(y), the sub-sampling seeded alike every epoch: the
    error against the clean g2(x) plus sigma^2 (Noise2Noise's argument), capped by the
    noise, too flat to choose by."""
    limits, columns, seed = DecodeLimits(), worker.config.data.columns, worker.config.data.val_seed
    totals = [0.0, 0.0, 0.0, 0.0]  # n2n psnr, count, sure mse, images with a noise estimate
    for batch in shard.iter_batches(batch_size=4, batch_format="numpy"):
        for row in range(len(batch[columns.image])):
            noisy = image_float(batch[columns.image][row], worker.channels, limits)
            if noisy is None or min(noisy.shape[:2]) < 8:
                continue
            height, width = noisy.shape[0] // 4 * 4, noisy.shape[1] // 4 * 4
            image = torch.from_numpy(np.ascontiguousarray(noisy[:height, :width].transpose(2, 0, 1)))[None]
            masks = neighbour_masks(tuple(image.shape), torch.Generator().manual_seed(seed))
            first, second = neighbour_subsample(image, masks)
            restored = runner.restore_images([first[0].numpy().transpose(1, 2, 0)])[0]
            error = float(np.mean((restored - second[0].numpy().transpose(1, 2, 0)) ** 2))
            totals[:2] = [totals[0] + 10 * math.log10(1 / max(error, 1e-10)), totals[1] + 1]
            gray_as_colour = noisy.shape[2] == 3 and (noisy[:, :, :1] == noisy).all()
            sigma = math.nan if gray_as_colour else estimate_sigma(noisy * np.float32(255)) / 255
            if math.isfinite(sigma):
                probe = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
                mse = sure_mse(worker.network, image.to(worker.device), sigma, probe.to(worker.device))
                totals[2:] = [totals[2] + mse, totals[3] + 1]
    psnr_sum, count, sure_sum, estimated = _all_reduce(totals)
    metrics = {"val_n2n_psnr": psnr_sum / max(count, 1), "val_images": int(count)}
    if estimated:
        metrics["val_sure_psnr"] = 10 * math.log10(1 / max(sure_sum / estimated, 1e-10))
    return metrics


def _validation_seed(config: TrainConfig, image_id) -> int:
    """The protocol's seed for every image; a sigma range draws its sigma from the seed
    first, so there each image gets a seed of its own (by id): with one seed for all,
    every image would be scored at the same sigma (about 30 of 0-55)."""
    if config.data.degradation.noise_sigma_range is None:
        return config.data.val_seed
    return degradation_seed(config.data.val_seed, str(image_id), per_image=True)


def _validate_with_references(worker: Worker, shard, runner, paired: bool) -> dict:
    from pipeline.evaluate import restore_and_score

    config = worker.config
    limits, columns = DecodeLimits(), config.data.columns
    mode = "L" if worker.channels == 1 else "RGB"
    totals = [0.0, 0.0, 0.0, 0.0]  # output psnr, output ssim, input psnr, count
    for batch in shard.iter_batches(batch_size=4, batch_format="numpy"):
        for row in range(len(batch[columns.image])):
            clean = image_float(batch[columns.target if paired else columns.image][row], worker.channels, limits)
            if clean is None:
                continue
            if paired:
                noisy = image_float(batch[columns.image][row], worker.channels, limits)
            else:
                seed = _validation_seed(config, batch[columns.id][row])
                noisy = config.data.degradation.apply(clean, np.random.RandomState(seed))
            if noisy is None or noisy.shape != clean.shape:
                continue
            scores = restore_and_score(runner, clean, noisy, mode)
            totals = [totals[0] + scores["output_psnr"], totals[1] + scores["output_ssim"],
                      totals[2] + scores["input_psnr"], totals[3] + 1]
    psnr_sum, ssim_sum, noisy_sum, count = _all_reduce(totals)
    count = max(count, 1)
    return {"val_psnr": psnr_sum / count, "val_ssim": ssim_sum / count, "val_noisy_psnr": noisy_sum / count,
            "val_images": int(count)}


def report_epoch(worker: Worker, metrics: dict) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (Ray Train's convention)."""
    import ray.train

    if worker.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="resflow-ckpt-") as directory:
        write_checkpoint(directory, worker.network, worker.optimizer, worker.state, worker.config, metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


HISTORY_FILE = "epochs.json"  # in the run's folder: every epoch's metrics, in order

# SURE's estimate moves by 0.1-0.3 dB from one epoch to the next where the true PSNR moves by
# hundredths (bench/README.md, "Picking a checkpoint without references"): its mean over the
# last few epochs picks a checkpoint at the end of a run of good ones, not one lucky epoch
SURE_EPOCHS = 3


def sure_score(sure_by_epoch: list[float]) -> float:
    """The score that picks a checkpoint without references: the mean `val_sure_psnr` of
    this epoch and the `SURE_EPOCHS` - 1 before it (fewer at the start)."""
    return float(np.mean(sure_by_epoch[-SURE_EPOCHS:]))


def read_history(uri: str) -> list[dict]:
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else []


def record_epoch(uri: str, metrics: dict, epoch: int) -> None:
    """Append an epoch to the run's history; an epoch redone after a restart replaces the
    rows from its first attempt."""
    history = [row for row in read_history(uri) if row["epoch"] < epoch] + [metrics]
    storage.write_bytes(uri, json.dumps(history).encode())


def describe_epoch(metrics: dict) -> str:
    if "val_psnr" in metrics:
        return (f"val PSNR {metrics['val_psnr']:.2f} dB (noisy {metrics['val_noisy_psnr']:.2f})  "
                f"SSIM {metrics['val_ssim']:.4f}")
    sure = f"val SURE PSNR {metrics['val_sure_psnr']:.2f} dB, " if "val_sure_psnr" in metrics else ""
    return f"{sure}N2N PSNR {metrics['val_n2n_psnr']:.2f} dB (reference-free)"


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    config = from_data(TrainConfig, loop_config["config"])
    kinds, hooks = loop_config["kinds"], loop_config.get("hooks") or TrainHooks()
    worker = setup_worker(config)
    worker.steps_per_epoch = loop_config["steps_per_epoch"]
    resume(worker)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    budget_s = config.optimiser.max_minutes * 60 if config.optimiser.max_minutes else None
    session_start = worker.session_start = time.time() - worker.state["elapsed_s"]
    epoch_seconds: list[float] = []
    sure_by_epoch = [row["val_sure_psnr"] for row in read_history(loop_config["history_uri"])
                     if row["epoch"] <= worker.state["epoch"] and row.get("val_sure_psnr") is not None]
    for epoch in range(worker.state["epoch"] + 1, config.optimiser.epochs + 1):
        elapsed = _all_reduce([time.time() - session_start], "max")[0]
        if budget_s and elapsed + (float(np.mean(epoch_seconds)) if epoch_seconds else 0.0) > budget_s:
            break  # the next epoch would overrun the budget: stop inside it
        epoch_start = time.time()
        losses, samples = train_one_epoch(worker, train_shard, epoch, kinds["train"], hooks)
        lr = worker.optimizer.param_groups[0]["lr"]
        train_seconds = time.time() - epoch_start
        if hooks.before_validation:
            hooks.before_validation(epoch, worker.network)
        metrics = validate(worker, val_shard, kinds["val"])
        loss_sum, sample_sum = _all_reduce([float(np.sum(losses)), float(samples)])
        steps = max(1, _all_reduce([float(len(losses))])[0])
        elapsed = time.time() - session_start
        worker.state.update({"epoch": epoch, "elapsed_s": elapsed})
        if "val_sure_psnr" in metrics:
            sure_by_epoch.append(metrics["val_sure_psnr"])
            metrics["val_score"] = sure_score(sure_by_epoch)
        metrics.setdefault("val_score", float(epoch))  # nothing to score by: the latest wins
        metrics.update({"epoch": epoch, "loss": loss_sum / steps, "lr": lr,
                        "patches_per_s": sample_sum / max(train_seconds, 1e-9), "elapsed_s": elapsed,
                        "resumed_from": worker.state["resumed_from"] or 0, "restarts": worker.state["restarts"]})
        if worker.rank == 0:  # before the checkpoint: a crash between the two redoes the epoch, rows replaced
            record_epoch(loop_config["history_uri"], metrics, epoch)
        report_epoch(worker, metrics)
        epoch_seconds.append(time.time() - epoch_start)
        if worker.rank == 0:
            left = (config.optimiser.epochs - epoch) * float(np.mean(epoch_seconds))
            left = min(left, max(0.0, budget_s - elapsed)) if budget_s else left
            print(f"epoch {epoch}/{config.optimiser.epochs}  loss {metrics['loss']:.5f}  {describe_epoch(metrics)}  "
                  f"{metrics['patches_per_s']:.0f} patches/s  lr {lr:.2e}  elapsed {_clock(elapsed)}  "
                  f"left ~{_clock(left)}", file=sys.stderr, flush=True)  # stdout carries results only


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# --- the driver -------------------------------------------------------------------------------


HISTORY_KEYS = ("epoch", "loss", "val_score", "val_psnr", "val_sure_psnr", "val_n2n_psnr", "lr", "elapsed_s")  # what cards and charts keep


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
                "resumed_from": self.resumed_from,
                "history": [{key: row.get(key) for key in HISTORY_KEYS} for row in self.history]}


def data_fingerprint(files: list[storage.FileInfo], degradation: Degradation) -> str:
    digest = hashlib.sha256()
    for info in files:
        digest.update(f"{storage.parse(info.uri).name}|{info.size}|{info.etag}\n".encode())
    digest.update(json.dumps(to_data(degradation), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def read_image_dataset(files: list[storage.FileInfo], columns: list[str]):
    import ray.data

    filesystem, _ = storage.pyarrow_filesystem(files[0].uri)
    paths = [storage.parse(info.uri).path for info in files]
    return ray.data.read_parquet(paths, filesystem=filesystem).select_columns(columns)


def inspect_for_training(uri: str, config: TrainConfig, training: bool) -> InspectedDataset:
    """The dataset's kind as training sees it (dataset.inspect): self-supervised training
    learns from the image column alone, so its training data ignores a target, and without
    a target its data is noisy-only (nothing clean to compare with)."""
    return inspect(uri, config.data.columns, kind_without_target=NOISY if config.data.self_supervised else CLEAN,
                   use_target=not (training and config.data.self_supervised))


def check_noise_map(config: TrainConfig, kind: str, val_kind: str = CLEAN) -> None:
    """A noise-map model is told each patch's noise level: only noise synthesised here has one."""
    if not config.model.architecture_config.get("noise_map"):
        return
    degradation = config.data.degradation
    if (not degradation.noise_sigma and not degradation.noise_sigma_range) or degradation.jpeg_quality:
        # after a JPEG round trip the noise restore measures is not the sigma drawn
        raise ValueError(f"a noise-map model (noise_map) is told the Gaussian noise sigma drawn for each patch: its "
                         f"degradation must add noise (a sigma or sigma range) and no JPEG, not "
                         f"{degradation.describe()}")
    if kind != CLEAN or config.data.self_supervised:
        raise ValueError("a noise-map model (noise_map) learns from clean images with Gaussian noise added in "
                         f"training, where each patch's level is known; this training set is {kind}"
                         f"{' and self-supervised' if config.data.self_supervised else ''}")
    if val_kind == NOISY:  # SURE calls the network on its own (metrics.sure_mse), with no level to tell it
        raise ValueError("a noise-map model is validated against references: give a clean or paired validation set")


def train(job: TrainJob, events: Events | None = None, hooks: TrainHooks | None = None) -> TrainResult:
    """Train on `job.data`, validate on `job.val_data` every epoch, publish the best
    checkpoint as a model version under the registry `job.registry`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import raycluster, registry
    from pipeline.modelio import load_model, save_model

    events = events or Events()
    config, columns = job.config, job.config.data.columns
    build_model(config.model.architecture, **config.model.architecture_config)  # a bad architecture stops the job here
    train_data = inspect_for_training(job.data, config, training=True)
    val_data = inspect_for_training(job.val_data, config, training=False)
    train_files, val_files, rows = train_data.files, val_data.files, train_data.rows
    kinds = {"train": train_data.kind, "val": val_data.kind}
    check_noise_map(config, kinds["train"], kinds["val"])
    fingerprint = data_fingerprint(train_files, config.data.degradation)
    run_name = job.run_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}-{fingerprint[:6]}"
    storage_path = storage.join(job.registry, "_runs")
    storage.ensure_bucket(storage_path)
    raycluster.connect()
    datasets = {part: read_image_dataset(files, [columns.id, columns.image] + ([columns.target] if kinds[part] == PAIRED else []))
                for part, files in (("train", train_files), ("val", val_files))}
    history_uri = storage.join(storage_path, run_name, HISTORY_FILE)
    select_by = "val_score"
    run_filesystem, run_path = storage.pyarrow_filesystem(storage_path)
    resources = {"CPU": config.scaling.cpus_per_worker, **({"GPU": 1} if config.scaling.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_data(config), "kinds": kinds, "hooks": hooks, "history_uri": history_uri,
                           "steps_per_epoch": max(1.0, rows * config.data.patches_per_image / (config.data.batch_size * config.scaling.workers))},
        scaling_config=ray.train.ScalingConfig(num_workers=config.scaling.workers, use_gpu=config.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=run_path, storage_filesystem=run_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoints.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoints.keep_checkpoints,
                                                         checkpoint_score_attribute=select_by,
                                                         checkpoint_score_order="max"),
        ),
        datasets=datasets,
    )
    if kinds["train"] == PAIRED and kinds["val"] == CLEAN:
        events.log(f"note: the training data is paired but {job.val_data} has no {columns.target!r} column: "
                   f"validation synthesises {config.data.degradation.describe()} on it, which need not be the pairs' degradation")
    described = {PAIRED: "paired", CLEAN: "clean + " + config.data.degradation.describe(),
                 NOISY: "noisy-only, self-supervised (Neighbor2Neighbor)"}
    events.log(f"training run {run_name!r}: {len(train_files)} train file(s) ({described[kinds['train']]}), "
               f"{len(val_files)} val file(s) ({kinds['val']}), {config.scaling.workers} worker(s) "
               f"{'GPU' if config.scaling.use_gpu else 'CPU'}; checkpoints in {storage.join(storage_path, run_name)}")
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training run {run_name} failed: {result.error}")
    candidates = result.best_checkpoints or ([(result.checkpoint, result.metrics)] if result.checkpoint else [])
    if not candidates:
        raise RuntimeError(f"training run {run_name} produced no checkpoint (no epoch finished?)")
    best_checkpoint, best_metrics = max(candidates, key=lambda item: item[1].get(select_by, float("-inf")))
    with best_checkpoint.as_directory() as directory:
        model, _ = load_model(directory)
        train_state = json.loads(Path(directory, TRAIN_STATE_FILE).read_text())
    metrics = {key: best_metrics[key] for key in ("val_psnr", "val_ssim", "val_noisy_psnr", "val_sure_psnr", "val_n2n_psnr", "val_score",
                                                  "epoch", "loss") if key in best_metrics}
    history = read_history(history_uri)
    version = f"{config.model.architecture}-{time.strftime('%Y%m%d-%H%M%S')}-{fingerprint[:6]}"
    published = save_model(
        registry.version_uri(job.registry, version), model, version=version, degradation=to_data(config.data.degradation),
        data_fingerprint=fingerprint, metrics=metrics,
        training={"config": to_data(config), "run_name": run_name, "paired": kinds["train"] == PAIRED,
                  "kinds": kinds, "epochs_run": train_state["epoch"], "wall_seconds": train_state["elapsed_s"],
                  "train_data": job.data, "val_data": job.val_data,
                  "history": [{key: row.get(key) for key in HISTORY_KEYS} for row in history]},
    )
    final = result.metrics or {}
    return TrainResult(registry.version_uri(job.registry, version), published.version, metrics, run_name,
                       storage.join(storage_path, run_name), history, int(final.get("restarts", 0)),
                       int(final.get("resumed_from", 0)))


def run(job: TrainJob, events: Events) -> dict:
    """The step contract (pipeline/steps.py): the training summary as JSON-ready data."""
    return train(job, events).summary()
