"""Inference: running a model on images, whole or tile by tile, batched.

Restoration, evaluation and training's validation all run models through here.
`ModelRunner` restores float images (H, W, C) in [0, 1], choosing the path per image (here,
and nowhere else): a colour model restores RGB jointly, and a gray image through its three
channels replicated, the result averaged back to one; a gray model restores a colour image
channel by channel, which ignores the correlation between channels (the run says so). `ImageRestorer` loads the model once in
`__init__` and restores a batch of encoded rows in `__call__` (decode -> estimate noise ->
restore -> encode), a bad row becoming `failed` with its reason and a row that needs
nothing (too small, or less noisy than `skip_below`) `skipped` with its input bytes.
Neither knows about Ray or storage:
`restore.replica.UnitRestorer`, the callable class that Ray Data runs in an actor pool, calls `ImageRestorer` on the rows of each file; a plain loop can too.

Tiling: an image larger than `tile` is cut into tiles that overlap by `tile_overlap`
pixels. Each tile's output is weighted by a ramp that is zero within overlap/4 of an
inner tile edge (where the tile's zero padding changes the result) and rises to one
across the middle of the overlap, so seams vanish and the result matches whole-image
restoration as long as the overlap covers the network's receptive field.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pipeline.config import RestoreSettings
from pipeline.contract import DecodeLimits, ImageColumns, transient
from pipeline.images import color_channels, decode, encode_png, from_float, to_float
from pipeline.modelio import load_model
from pipeline.models import takes_noise_level
from pipeline.noise import estimate_sigma

# A forward pass frees its activations layer by layer and allocates the same sizes for the
# next; glibc's defaults hand that memory to the kernel at once, so every layer faults it
# back in, zeroed. These keep it for the next layer: faults per replica 3.4 M -> 0.2 M, a
# 10x run 11-17% faster, for a larger resident set (bench/README.md, "Freed memory").
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
CPU_MALLOC_SETTINGS = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 256 * 2**20, _M_TOP_PAD: 64 * 2**20}


def keep_freed_memory() -> bool:
    """Apply CPU_MALLOC_SETTINGS to this process; False where the C library is not glibc
    (which has its own policy) or refused them."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in CPU_MALLOC_SETTINGS.items())


def native_bf16(device: str) -> bool:
    """Whether bfloat16 runs natively on `device`: any CUDA device torch runs here, or a CPU
    with AVX512-BF16 or AMX. There autocasting to bf16 roughly doubles the convolutions'
    speed (bench/README.md, "bf16 on CPU"); elsewhere it would be emulated, and slower."""
    if device.startswith("cuda"):
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# How a model meets an image (`ModelRunner.channel_path`): its own channel count, all at once;
# a gray model on a colour image, one channel at a time; a colour model on a gray image,
# the gray channel replicated to RGB and the output averaged back to gray.
JOINT, PER_CHANNEL, REPLICATED = "joint", "per-channel", "replicated"


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def blend_ramp(length: int, overlap: int, start_is_border: bool, end_is_border: bool) -> np.ndarray:
    weight = np.ones(length, np.float32)
    if overlap <= 0:
        return weight
    distance = np.arange(length, dtype=np.float32)
    ramp = np.clip((distance + 0.5 - overlap / 4) / (overlap / 2), 0.0, 1.0)
    if not start_is_border:
        weight = np.minimum(weight, ramp)
    if not end_is_border:
        weight = np.minimum(weight, ramp[::-1])
    return weight


class ModelRunner:
    """Runs a loaded network on float images in [0, 1], whole or tiled, batching
    equal-shaped pieces from many images into one forward pass."""

    def __init__(self, model: torch.nn.Module, settings: RestoreSettings):
        self.model = model.to(settings.device).eval()
        self.settings = settings
        self.channels = model.config.channels
        self.takes_noise_level = takes_noise_level(model)
        # Channels-last convolutions: ~40% faster on CPU (oneDNN); on GPUs the tensor cores'
        # native layout for bf16.
        self.model = self.model.to(memory_format=torch.channels_last)
        # Process-wide, set by the process that runs the model on CPU: a replica, the
        # benchmark's forward pass and loop, evaluation. (On GPU the activations live on the
        # device, in torch's caching allocator.)
        self.keeps_freed_memory = settings.device == "cpu" and keep_freed_memory()
        self.autocast = dict(device_type="cuda" if settings.device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                             enabled=settings.bf16 and native_bf16(settings.device))

    def channel_path(self, image_channels: int) -> str:
        """How this model restores an image of `image_channels` colour channels (1 or 3)."""
        if image_channels == self.channels:
            return JOINT
        if self.channels == 1:
            return PER_CHANNEL
        if image_channels == 1:
            return REPLICATED
        raise ValueError(f"a {self.channels}-channel model cannot restore a {image_channels}-channel image")

    @torch.inference_mode()
    def _forward(self, pieces: list[np.ndarray], levels: list[float]) -> list[np.ndarray]:
        batch = torch.from_numpy(np.stack(pieces)).to(self.settings.device).contiguous(memory_format=torch.channels_last)
        told = (torch.tensor(levels, device=self.settings.device),) if self.takes_noise_level else ()
        with torch.autocast(**self.autocast):
            out = self.model(batch, *told)
        return list(out.float().cpu().numpy())

    def run(self, images: list[np.ndarray], levels: list[float] | None = None) -> list[np.ndarray]:
        """Restore a list of float (C, H, W) images of any sizes; returns the same shapes.
        `levels`: each image's noise sigma / 255, for a noise-map model (every tile of an
        image is told the whole image's)."""
        if self.takes_noise_level and (levels is None or len(levels) != len(images)):
            raise ValueError("a noise-map model needs one noise level per image")
        levels = levels if levels is not None else [0.0] * len(images)
        tile, overlap = self.settings.tile, self.settings.tile_overlap
        outputs: list[np.ndarray | None] = [None] * len(images)
        weights: dict[int, np.ndarray] = {}  # tiled images: the blend weights summed so far
        jobs = defaultdict(list)  # piece shape -> [(image index, y, x)]
        for index, image in enumerate(images):
            height, width = image.shape[1:]
            rows, columns = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
            if len(rows) * len(columns) > 1:
                outputs[index] = np.zeros_like(image)
                weights[index] = np.zeros(image.shape[1:], np.float32)
            for y in rows:
                for x in columns:
                    jobs[(min(tile, height), min(tile, width))].append((index, y, x))
        rows_per_forward = self.settings.rows_per_forward
        for (ph, pw), placements in jobs.items():  # one shape per pass: a batch is never padded
            for start in range(0, len(placements), rows_per_forward):
                chunk = placements[start : start + rows_per_forward]
                pieces = [images[i][:, y : y + ph, x : x + pw] for i, y, x in chunk]
                for (i, y, x), restored in zip(chunk, self._forward(pieces, [levels[i] for i, _, _ in chunk])):
                    if i not in weights:  # a whole image in one piece: nothing to blend
                        outputs[i] = restored
                        continue
                    height, width = images[i].shape[1:]
                    w = np.outer(blend_ramp(ph, overlap, y == 0, y + ph == height),
                                 blend_ramp(pw, overlap, x == 0, x + pw == width))
                    outputs[i][:, y : y + ph, x : x + pw] += restored * w
                    weights[i][y : y + ph, x : x + pw] += w
        for i, weight in weights.items():
            outputs[i] /= weight
        return outputs

    def restore_images(self, images: list[np.ndarray], each=map,
                       noise_sigmas: list[float | None] | None = None) -> list[np.ndarray]:
        """Restore float (H, W, C) images of any sizes, gray (C = 1) or colour (C = 3), with
        the path `channel_path` names for each. `each` maps a function over items (a thread
        pool's map spreads the layout work). A noise-map model is told each image's noise
        sigma (0-255): from `noise_sigmas` where given (restore has estimated it already),
        otherwise estimated here."""
        sigmas = [None] * len(images) if noise_sigmas is None else list(noise_sigmas)
        if len(sigmas) != len(images):
            raise ValueError(f"{len(sigmas)} noise sigmas for {len(images)} images")
        if self.takes_noise_level:
            sigmas = list(each(lambda pair: image_noise_sigma(pair[0]) if pair[1] is None else pair[1],
                               zip(images, sigmas)))
        planes, layout, levels = [], [], []
        for image, sigma in zip(images, sigmas):
            chw = np.ascontiguousarray(image.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)
            path = self.channel_path(chw.shape[0])
            layout.append((len(planes), chw.shape[0] if path == PER_CHANNEL else 1, path))
            if path == JOINT:
                planes.append(chw)
            elif path == PER_CHANNEL:
                planes.extend(chw[c : c + 1] for c in range(chw.shape[0]))
            else:  # REPLICATED: a gray image as the colour image whose channels all equal it
                planes.append(np.ascontiguousarray(np.repeat(chw, self.channels, axis=0)))
            levels.extend([(sigma or 0.0) / 255.0] * (len(planes) - len(levels)))
        restored = self.run(planes, levels if self.takes_noise_level else None)

        def gather(place):
            first, count, path = place
            chw = restored[first] if count == 1 else np.concatenate(restored[first : first + count], axis=0)
            if path == REPLICATED:
                chw = chw.mean(axis=0, keepdims=True)  # (3, H, W) -> (1, H, W): the image stays gray
            return chw.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)

        return list(each(gather, layout))


class ImageRestorer:
    """Decode -> estimate noise -> restore -> encode a batch of rows; a bad row becomes
    `failed` with its reason, a row that needs nothing `skipped` with its input bytes.
    Safe to call from two threads at once (a GPU replica overlaps one call's PNG work with
    another's forward pass)."""

    def __init__(self, model_uri: str, settings: RestoreSettings = RestoreSettings(),
                 columns: ImageColumns = ImageColumns(), limits: DecodeLimits = DecodeLimits(),
                 base_dir: str | None = None):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        model, card = load_model(model_uri, map_location=settings.device)
        self.runner = ModelRunner(model, settings)
        self.model_version = card.version
        self.settings = settings
        self.columns = columns
        self.limits = limits
        self.base_dir = base_dir
        io_threads = settings.io_threads or 1
        self.io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="resflow-io") if io_threads > 1 else None

    def _each(self, function, items) -> list:
        """`function` over `items`, on the I/O threads when there are several."""
        if self.io_pool is None:
            return [function(item) for item in items]
        return list(self.io_pool.map(function, items))

    def restore_pixels(self, pixels_list: list[np.ndarray], modes: list[str],
                       noise_sigmas: list[float | None] | None = None) -> list[np.ndarray]:
        """Restore decoded images, keeping mode, depth and alpha."""
        floats = self._each(lambda item: to_float(*item), zip(pixels_list, modes))
        restored = self.runner.restore_images([color for color, _ in floats], each=self._each, noise_sigmas=noise_sigmas)
        return self._each(lambda item: from_float(item[0], item[1], item[2][1]), zip(restored, modes, floats))

    def _encode(self, pixels_mode_orientation) -> tuple[bytes | None, str | None]:
        pixels, mode, orientation = pixels_mode_orientation
        try:
            return encode_png(pixels, mode, self.settings.png_compress_level, orientation), None
        except Exception as error:
            return None, f"encoding failed: {type(error).__name__}: {error}"

    def __call__(self, batch: dict[str, np.ndarray], timings: dict | None = None) -> dict[str, np.ndarray]:
        """Restore a batch of rows; `timings`, when given, gains the seconds this call spent
        decoding, estimating noise, in the forward pass (with float conversion) and encoding.

        Every decoded row gets its estimated noise sigma. A row is `skipped`, its input bytes
        carried unchanged and no model call made for it, when its image is smaller than
        `limits.min_side` (too little for the model to help) or its noise is below
        `settings.skip_below`; its error stays null."""
        values = batch[self.columns.image]
        count = len(values)
        encoded: list[bytes | None] = [None] * count
        errors: list[str | None] = [None] * count
        skipped = [False] * count
        clock = time.perf_counter()
        decoded_all = self._each(lambda value: decode(value, self.limits, self.base_dir), values)
        clock = _lap(timings, "decode", clock)
        sigmas = self._each(lambda decoded: _noise_sigma(decoded) if decoded.ok else None, decoded_all)
        clock = _lap(timings, "noise", clock)
        decoded_rows, pixels_list, modes, orientations, row_sigmas = [], [], [], [], []
        skip_below = self.settings.skip_below
        for row, (decoded, sigma) in enumerate(zip(decoded_all, sigmas)):
            if decoded.too_small or (skip_below is not None and sigma is not None and sigma < skip_below):
                encoded[row], skipped[row] = decoded.data, True
            elif not decoded.ok:
                errors[row] = decoded.error
            else:
                decoded_rows.append(row)
                pixels_list.append(decoded.pixels)
                modes.append(decoded.mode)
                orientations.append(decoded.orientation)
                row_sigmas.append(sigma)
        try:
            restored = self.restore_pixels(pixels_list, modes, row_sigmas)
        except Exception as error:  # e.g. out of memory on one huge image: fail these rows, keep going
            restored = []
            reason = f"restoration failed: {type(error).__name__}: {error}"
            for row in decoded_rows:
                errors[row] = transient(reason) if out_of_memory(error) else reason
        clock = _lap(timings, "forward", clock)
        for row, (png, error) in zip(decoded_rows, self._each(self._encode, zip(restored, modes, orientations))):
            encoded[row], errors[row] = png, error
        _lap(timings, "encode", clock)
        out = {key: value for key, value in batch.items() if key != self.columns.image}
        out[self.columns.image] = np.array(encoded, dtype=object)
        out["status"] = np.array(["failed" if error else "skipped" if skip else "ok"
                                  for error, skip in zip(errors, skipped)], dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["model_version"] = np.array([self.model_version] * count, dtype=object)
        out["noise_sigma"] = np.array(sigmas, dtype=object)
        # Colour rows that a gray model restored one channel at a time: the run's summary says so once.
        per_channel = np.zeros(count, dtype=bool)
        for row, mode in zip(decoded_rows, modes):
            per_channel[row] = errors[row] is None and self.runner.channel_path(color_channels(mode)) == PER_CHANNEL
        out["per_channel"] = per_channel
        return out


def out_of_memory(error: BaseException) -> bool:
    """Host or device memory ran out: a reason that can pass on a later run (a quieter
    node, a larger GPU), unlike a model that cannot take the image."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


def image_noise_sigma(image: np.ndarray) -> float:
    """A float (H, W, C) image's estimated noise sigma (0-255); 0 when it is too small to
    tell (a noise-map model then leaves it nearly as it is)."""
    sigma = estimate_sigma(image * np.float32(255.0), "L" if image.shape[2] == 1 else "RGB")
    return 0.0 if math.isnan(sigma) else sigma


def _noise_sigma(decoded) -> float | None:
    """The decoded image's estimated noise sigma (0-255), None when it is too small to tell."""
    sigma = estimate_sigma(decoded.pixels, decoded.mode)
    return None if math.isnan(sigma) else sigma


def _lap(timings: dict | None, stage: str, since: float) -> float:
    """Add the seconds since `since` to `timings[stage]`; returns now."""
    now = time.perf_counter()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + now - since
    return now
