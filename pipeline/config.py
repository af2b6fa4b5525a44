"""The settings every step takes: typed, frozen, each default written once, here.

Every field has a default that runs on a laptop and a one-line reason; validation in
`__post_init__` says what to change. Training presets are functions derived with
`dataclasses.replace`, not a file per combination. Nothing heavy is imported: the CLI builds its
help from these defaults without loading torch, pyarrow or Ray.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, replace

from pipeline.contract import ImageColumns
from pipeline.degradations import Degradation

# Images (or tiles) per forward pass when the settings do not say. On CPU one at a time, as
# a plain loop runs them: oneDNN already spreads one image over the cores, and a larger batch
# only moves activations out of the cache (DnCNN-S on BSD68: 4 per pass ran at 0.41-0.62x of
# the one-at-a-time loop, 1 per pass 0.93x); GPUs want many (bench/README.md, "Rows per model
# call"). Only equal shapes share a pass (pipeline/inference.py): batching never pads.
CPU_BATCH_SIZE = 1
GPU_BATCH_SIZE = 16
# Rows decoded, restored and encoded together in one call: enough for the PNG threads to
# share (decode and encode run on `io_threads`, one row each), bounded in memory by
# `max_call_megapixels`.
ROWS_PER_CALL = 8


@dataclass(frozen=True)
class RestoreSettings:
    """How a model runs on images: restore, evaluation and training validation use them."""

    tile: int = 512  # images larger than this are restored tile by tile; memory is bounded by the tile
    tile_overlap: int = 64  # >= 4x the receptive radius keeps tiled == whole (DnCNN-17: radius 17)
    batch_size: int | None = None  # tiles or same-sized images per forward pass; None: 1 on CPU, 16 on GPU
    max_call_megapixels: float = 32.0  # decoded pixels one model call holds; a larger image is a call alone
    device: str = "cpu"  # "cuda" on GPU replicas
    bf16: bool = True  # autocast to bfloat16 where the hardware computes it natively (CUDA; AVX512-BF16/AMX CPUs)
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    # zlib level of the output PNGs, lossless at every level: 1 encodes restored images in
    # 0.6-0.8x of level 3's time for 1-2% more bytes (bench/README.md, "PNG codecs")
    png_compress_level: int = 1
    # Threads that decode and encode the rows of a call (the codecs release the GIL): a GPU
    # replica spreads its PNG work over its node's CPUs, a CPU replica over its own cores;
    # None: one (a restore's replicas get theirs from pipeline/restore/).
    io_threads: int | None = None
    # Rows whose estimated noise sigma (0-255 scale, pipeline/noise.py) is below this are left
    # untouched, status `skipped`; None restores every row (the estimate is recorded either way).
    skip_below: float | None = None

    def __post_init__(self):
        if self.tile < 16:
            raise ValueError(f"tile must be >= 16 pixels, got {self.tile}")
        if not 0 <= self.tile_overlap < self.tile // 2:
            raise ValueError(f"tile_overlap must be within 0 and tile/2 ({self.tile // 2}), got {self.tile_overlap}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_call_megapixels <= 0:
            raise ValueError(f"max_call_megapixels must be positive, got {self.max_call_megapixels}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must be a zlib level within 0 and 9, got {self.png_compress_level}")
        if self.io_threads is not None and self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")
        if self.skip_below is not None and not self.skip_below >= 0:
            raise ValueError(f"skip_below must be a noise sigma >= 0 on the 0-255 scale (or None to restore "
                             f"every image), got {self.skip_below}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @property
    def rows_per_forward(self) -> int:
        """Same-shaped images or tiles in one forward pass: `batch_size`, else the device's default."""
        if self.batch_size is not None:
            return self.batch_size
        return CPU_BATCH_SIZE if self.device == "cpu" else GPU_BATCH_SIZE

    @property
    def rows_per_call(self) -> int:
        """Rows one restore call decodes, restores and encodes together."""
        return max(self.rows_per_forward, ROWS_PER_CALL)


def _check(owner: str, checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{owner}: {message}")


@dataclass(frozen=True)
class ModelSettings:
    """Which network is trained."""

    architecture: str = "dncnn"  # a name in pipeline.models.MODELS
    architecture_config: dict = field(default_factory=lambda: {"depth": 10, "width": 32})  # its config class's fields


@dataclass(frozen=True)
class DataSettings:
    """What the network sees: patches of which images, degraded how, in batches of how many."""

    degradation: Degradation = Degradation(noise_sigma=25)  # synthesised on clean data; ignored for paired data
    patch_size: int = 40  # the DnCNN paper's 40 x 40 for sigma 25
    patches_per_image: int = 16  # random crops per image per epoch, each with a random flip/rotation
    batch_size: int = 64  # per worker; the global batch is workers x batch_size
    # Learn from noisy images alone (Neighbor2Neighbor, Huang et al. 2021): no target column,
    # no clean images; the training set's image column is taken as already noisy.
    self_supervised: bool = False
    # Weigh each patch's squared error by 1 / its noise's standard deviation (train.balanced_mse):
    # over a sigma range plain MSE is mostly the noisiest patches'. The logged loss is the weighted one.
    balance_noise_levels: bool = False
    val_seed: int = 0  # the protocol seeds every validation image's noise with 0
    columns: ImageColumns = ImageColumns()

    def __post_init__(self):
        _check("DataSettings", [
            (self.patch_size >= 8, f"patch_size must be >= 8, got {self.patch_size}"),
            (self.patches_per_image >= 1, "patches_per_image must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (not self.self_supervised or self.patch_size % 4 == 0,
             f"self-supervised training trains on half-size sub-patches, which a half-resolution network"
             f" halves again: patch_size must be a multiple of 4, got {self.patch_size}"),
            (not (self.self_supervised and self.balance_noise_levels),
             "balance_noise_levels weighs the error against a clean target, which self-supervised training has none of"),
        ])


@dataclass(frozen=True)
class OptimiserSettings:
    """Adam, its learning-rate schedule, and how long it runs."""

    learning_rate: float = 1e-3  # Adam, for the global batch of one worker (scaled by sqrt(workers))
    min_learning_rate: float = 1e-5  # cosine schedule floor
    warmup: float = 0.0  # share of the schedule over which the learning rate rises linearly to its peak
    grad_clip: float = 0.5  # max gradient norm; keeps early Adam steps on BN-free nets stable
    epochs: int = 50  # upper bound; max_minutes may end training sooner
    max_minutes: float | None = None  # wall-clock budget; the LR schedule anneals to it

    def __post_init__(self):
        _check("OptimiserSettings", [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes must be positive"),
            (0 < self.min_learning_rate <= self.learning_rate, "need 0 < min_learning_rate <= learning_rate"),
            (0 <= self.warmup < 1, "warmup must be within [0, 1)"),
        ])


@dataclass(frozen=True)
class CheckpointSettings:
    """What is kept, and how often a failed worker group starts again from it."""

    keep_checkpoints: int = 3  # best N by validation PSNR stay in storage
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before the run fails

    def __post_init__(self):
        _check("CheckpointSettings", [(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")])


@dataclass(frozen=True)
class ScalingSettings:
    """Where training runs: Ray Train workers and what each reserves."""

    workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker
    bf16: bool = True  # autocast to bfloat16 where the hardware computes it natively (CUDA; AVX512-BF16/AMX CPUs)
    cpus_per_worker: float = 1.0  # logical CPUs each worker reserves (fractions keep 2-core machines alive)
    threads_per_worker: int | None = None  # torch threads; None: physical cores / workers on CPU (not written back)

    def __post_init__(self):
        _check("ScalingSettings", [(self.workers >= 1, "workers must be >= 1"),
                                   (self.cpus_per_worker > 0, "cpus_per_worker must be positive")])


@dataclass(frozen=True)
class TrainConfig:
    """A training run's settings by concern (torchtitan style): `config.optimiser.learning_rate`.
    Presets and overrides name fields flat (`train_config(learning_rate=2e-3)`, `--learning-rate`):
    every field name is unique across the groups."""

    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    optimiser: OptimiserSettings = OptimiserSettings()
    checkpoints: CheckpointSettings = CheckpointSettings()
    scaling: ScalingSettings = ScalingSettings()
    seed: int = 0  # seeds init, patch sampling and the synthetic degradations


def _setting_owners(value) -> tuple[set[str], dict[str, str]]:
    """`value`'s own fields that are not groups, and each group field's name -> the group holding it."""
    groups = [item.name for item in dataclasses.fields(value) if dataclasses.is_dataclass(getattr(value, item.name))]
    owners = {inner.name: outer for outer in groups for inner in dataclasses.fields(getattr(value, outer))}
    return {item.name for item in dataclasses.fields(value)} - set(groups), owners


def setting_names(value) -> set[str]:
    """Every name `with_settings` takes for `value`."""
    own, owners = _setting_owners(value)
    return own | set(owners)


def with_settings(value, **named):
    """`value` (a frozen dataclass) with fields replaced by name, whether its own or those of
    the dataclasses it holds (one level: TrainConfig's groups, RestoreJob's settings). A name
    found nowhere is an error that lists them all; None leaves a field as it is."""
    given = {name: item for name, item in named.items() if item is not None}
    own, owners = _setting_owners(value)
    unknown = sorted(set(given) - own - set(owners) - {item.name for item in dataclasses.fields(value)})
    if unknown:
        raise ValueError(f"unknown {type(value).__name__} setting(s) {unknown}; known: {sorted(own | set(owners))}")
    groups = {}
    for name, item in given.items():
        if name in owners and name not in own:  # on the group as given, if it is given whole too
            outer = owners[name]
            groups[outer] = replace(groups.get(outer, given.get(outer, getattr(value, outer))), **{name: item})
    return replace(value, **groups, **{name: item for name, item in given.items() if name not in owners | groups.keys()})


def train_config(**named) -> TrainConfig:
    """A TrainConfig from flat field names (`with_settings` on the defaults)."""
    return with_settings(TrainConfig(), **named)


# --- training presets: functions, derived with replace --------------------------------------


def tiny() -> TrainConfig:
    """Tests and smoke runs: a 2-block residual net that trains in seconds and beats the noisy input."""
    return train_config(architecture="resnet", architecture_config={"blocks": 2, "width": 16, "unshuffle": 2},
                        patch_size=32, patches_per_image=64, batch_size=32, epochs=3, learning_rate=2e-3)


def cpu() -> TrainConfig:
    """Two CPU cores, about 30 minutes: a residual-block network at half resolution
    (pixel-unshuffle) sees a 2x wider receptive field for a quarter of the work per pixel;
    bf16 where the CPU has it; Adam at 1e-3 after a short warm-up (a peak of 2e-3 made
    validation fall for a dozen epochs: bench/README.md, "Training quality")."""
    return train_config(architecture="resnet", architecture_config={"blocks": 6, "width": 48, "unshuffle": 2},
                        patch_size=48, patches_per_image=32, batch_size=32, epochs=400, max_minutes=30,
                        learning_rate=1e-3, warmup=0.03)


def cpu_blind() -> TrainConfig:
    """The cpu preset trained over noise sigma 0-55 (one sigma drawn per patch): one model for any level in the range."""
    return with_settings(cpu(), degradation=Degradation(noise_sigma=None, noise_sigma_range=(0.0, 55.0)))


def dncnn_cpu() -> TrainConfig:
    """The paper's DnCNN, shallower (10 x 32), for CPUs."""
    return train_config(architecture="dncnn", architecture_config={"depth": 10, "width": 32}, epochs=400, max_minutes=30)


def dncnn_paper() -> TrainConfig:
    """GPU workers: DnCNN-S (Zhang et al. 2017, sigma 25), 17 x 64 with BN, 40 x 40 patches,
    batch 128, Adam 1e-3 decaying to 1e-4 over 50 epochs."""
    return train_config(architecture="dncnn", architecture_config={"depth": 17, "width": 64, "batch_norm": True},
                        patch_size=40, patches_per_image=128, batch_size=128, epochs=50, learning_rate=1e-3,
                        min_learning_rate=1e-4, use_gpu=True)


# --- colour presets: RGB in, RGB out, trained on colour data (CBSD432), noise drawn per channel ------


def colour(preset: TrainConfig) -> TrainConfig:
    """`preset`'s network with 3 input and output channels: RGB restored jointly."""
    return with_settings(preset, architecture_config={**preset.model.architecture_config, "channels": 3})


def cpu_color() -> TrainConfig:
    """Colour photographs on two CPU cores, about 30 minutes: the cpu preset on RGB (channels
    restored jointly)."""
    return colour(cpu())


def cpu_color_blind() -> TrainConfig:
    """The cpu-color preset over noise sigma 0-55, one sigma per patch: one colour model for any level."""
    return with_settings(cpu_color(), degradation=Degradation(noise_sigma=None, noise_sigma_range=(0.0, 55.0)))


def dncnn_color() -> TrainConfig:
    """GPU workers: colour DnCNN (CDnCNN-B, Zhang et al. 2017), 20 x 64 with BN on RGB, blind
    over sigma 0-55, 50 x 50 patches, batch 128, Adam 1e-3 to 1e-4 over 50 epochs."""
    return with_settings(dncnn_paper(), architecture_config={"depth": 20, "width": 64, "batch_norm": True, "channels": 3},
                         patch_size=50, degradation=Degradation(noise_sigma=None, noise_sigma_range=(0.0, 55.0)))


TRAIN_PRESETS = {"tiny": tiny, "cpu": cpu, "cpu-blind": cpu_blind, "dncnn-cpu": dncnn_cpu, "dncnn-paper": dncnn_paper,
                 "cpu-color": cpu_color, "cpu-color-blind": cpu_color_blind, "dncnn-color": dncnn_color}


def train_preset(name: str, **overrides) -> TrainConfig:
    """A preset with `overrides` (None values leave the preset's choice)."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
    return with_settings(TRAIN_PRESETS[name](), **overrides)


def preset_summary(name: str) -> str:
    """One line for --help: the preset's docstring's first sentence."""
    return (TRAIN_PRESETS[name].__doc__ or "").strip().split("\n")[0]


# --- plain data in and out: how jobs and configs travel as JSON ------------------------------


def to_data(value):
    """A config or job as JSON-ready data (dataclasses to dicts, tuples to lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: to_data(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_data(item) for item in value]
    if isinstance(value, dict):
        return {key: to_data(item) for key, item in value.items()}
    return value


def from_data(cls, data: dict):
    """The inverse of `to_data`, by the type hints of `cls`; an unknown field is an error
    that names the known ones (a typo in a job must not be silently ignored)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} expects an object, got {type(data).__name__}")
    names = [item.name for item in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {names}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _typed(hints[name], value) for name, value in data.items()})


def _typed(hint, value):
    if value is None:
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_data(hint, value)
    if typing.get_origin(hint) is tuple:
        return tuple(value)
    return value
