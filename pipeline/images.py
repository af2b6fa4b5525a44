"""Images in Parquet: the schema of DESIGN.md, decoding with limits, lossless encoding.

An image value is either raw encoded bytes (PNG, JPEG, TIFF, WebP, BMP) or the Hugging
Face `datasets` layout struct<bytes: binary, path: string>. Decoding never raises for a
bad image: `decode` returns a `Decoded` with `error` set, so one corrupt row becomes one
`failed` row and the rest of the batch goes on (STYLE.md: errors are values at row level).

Pixel arrays keep the input's mode and depth:
    L     uint8  (H, W)        gray
    I;16  uint16 (H, W)        16-bit gray
    RGB   uint8  (H, W, 3)
    RGBA  uint8  (H, W, 4)     alpha is carried through untouched
    LA    uint8  (H, W, 2)     gray + alpha
Palette and 1-bit images are expanded to RGB(A) / L, since a restored image is no longer
limited to a palette.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile

# Pillow's own bomb check warns at ~89 MP and raises at ~179 MP; resflow checks the
# declared size against its own limit before decoding, so Pillow's check is turned off.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey stripe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 64_000_000  # 8k x 8k; a larger declared size is a decompression bomb until proven otherwise
    min_side: int = 8  # smaller images carry too little content to restore or to score (SSIM window is 11)
    max_bytes: int = 256 * 1024 * 1024  # an encoded value beyond this is not a plausible image

    def __post_init__(self):
        if self.max_pixels < 1 or self.min_side < 1 or self.max_bytes < 1:
            raise ValueError("DecodeLimits: max_pixels, min_side and max_bytes must be positive")


@dataclass(frozen=True)
class ImageColumns:
    """Names of the data contract's columns (configurable per dataset)."""

    id: str = "image_id"
    image: str = "image"
    target: str = "target"


class SchemaError(ValueError):
    """A dataset whose columns do not follow the data contract: stops a job before it starts."""


@dataclass
class Decoded:
    pixels: np.ndarray | None  # None when decoding failed
    mode: str = ""
    format: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def is_image_type(data_type: pa.DataType) -> bool:
    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
        return True
    if pa.types.is_struct(data_type):
        names = {data_type.field(i).name for i in range(data_type.num_fields)}
        return "bytes" in names
    return False


def validate_schema(schema: pa.Schema, columns: ImageColumns = ImageColumns(), *, need_target: bool = False,
                    where: str = "the dataset") -> None:
    """Raise SchemaError naming the problem when `schema` breaks the data contract."""
    names = schema.names
    problems = []
    if columns.id not in names:
        problems.append(f"no id column {columns.id!r}")
    elif not (pa.types.is_string(schema.field(columns.id).type) or pa.types.is_large_string(schema.field(columns.id).type)):
        problems.append(f"id column {columns.id!r} has type {schema.field(columns.id).type}, expected string")
    image_columns = [columns.image] + ([columns.target] if need_target else [])
    for name in image_columns:
        if name not in names:
            problems.append(f"no image column {name!r}")
        elif not is_image_type(schema.field(name).type):
            problems.append(f"column {name!r} has type {schema.field(name).type}, expected binary (encoded image "
                            f"bytes) or struct<bytes: binary, path: string> (Hugging Face Image)")
    if problems:
        raise SchemaError(f"{where} does not follow the image data contract: {'; '.join(problems)}. "
                          f"Columns present: {names}. Name other columns with --id-column/--image-column/--target-column.")


def image_bytes(value, base_dir: str | None = None) -> tuple[bytes | None, str | None]:
    """The encoded bytes of an image cell, or (None, reason).

    A Hugging Face Image cell built from file paths stores bytes=None and only a path;
    such a path is read relative to `base_dir` (the dataset's location) when relative."""
    if value is None:
        return None, "the image value is null"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None:
            return bytes(data), None
        path = value.get("path")
        if not path:
            return None, "the image struct has neither bytes nor a path"
        from pipeline import storage

        if base_dir is not None and "://" not in path and not os.path.isabs(path):
            path = storage.join(base_dir, path)
        try:
            return storage.read_bytes(path), None
        except Exception as error:  # the row fails, not the batch
            return None, f"the image struct has no bytes and its path {path!r} could not be read: {error}"
    return None, f"unsupported image value of type {type(value).__name__}"


def decode(value, limits: DecodeLimits = DecodeLimits(), base_dir: str | None = None) -> Decoded:
    data, reason = image_bytes(value, base_dir)
    if data is None:
        return Decoded(None, error=reason)
    if len(data) == 0:
        return Decoded(None, error="the image value is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        return Decoded(None, error=f"encoded image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width * height > limits.max_pixels:
                return Decoded(None, error=f"image declares {width}x{height} = {width * height} pixels, over the "
                                           f"limit of {limits.max_pixels} (decompression bomb guard; raise max_pixels to allow it)")
            if min(width, height) < limits.min_side:
                return Decoded(None, error=f"image is {width}x{height} pixels, smaller than the minimum "
                                           f"{limits.min_side}x{limits.min_side}")
            image.load()
            fmt = image.format or ""
            pixels, mode = _to_array(image)
    except Image.UnidentifiedImageError:  # its message names the in-memory buffer's address, not the problem
        return Decoded(None, error=f"cannot decode image: not a format Pillow reads (starts with {data[:8]!r})")
    except Exception as error:
        return Decoded(None, error=f"cannot decode image: {type(error).__name__}: {error}")
    return Decoded(pixels, mode, fmt)


def _to_array(image: Image.Image) -> tuple[np.ndarray, str]:
    mode = image.mode
    if mode == "P" or mode == "PA":
        mode = "RGBA" if ("transparency" in image.info or mode == "PA") else "RGB"
        image = image.convert(mode)
    elif mode == "1":
        image, mode = image.convert("L"), "L"
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image, mode = image.convert("RGB"), "RGB"
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.uint16).copy(), "I;16"
    elif mode == "I":  # 32-bit int containers hold 16-bit PNG/TIFF data
        array = np.asarray(image)
        if array.min() < 0 or array.max() > 65535:
            raise ValueError("32-bit integer images beyond the 16-bit range are not supported")
        return array.astype(np.uint16), "I;16"
    elif mode == "F":
        raise ValueError("floating-point images are not supported")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        image, mode = image.convert("RGB"), "RGB"
    return np.array(image), mode


def encode_png(pixels: np.ndarray, mode: str, compress_level: int = 3) -> bytes:
    """Lossless PNG in the given mode; level 3 is near level 6's size at a fraction of its time."""
    if mode == "I;16":
        image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint16))  # -> I;16
    else:
        image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


# --- pixels <-> float, the representation models work in ----------------------------------


def max_value(mode: str) -> float:
    return 65535.0 if mode == "I;16" else 255.0


def color_channels(mode: str) -> int:
    """How many channels a restoration model sees (alpha is not restored)."""
    return 3 if mode in ("RGB", "RGBA") else 1


def split_alpha(pixels: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, C) colour channels and the alpha plane (or None)."""
    if pixels.ndim == 2:
        return pixels[:, :, None], None
    channels = color_channels(mode)
    alpha = pixels[:, :, channels] if pixels.shape[2] > channels else None
    return pixels[:, :, :channels], alpha


def to_float(pixels: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 (H, W, C) in [0, 1] and the untouched alpha plane."""
    color, alpha = split_alpha(pixels, mode)
    return color.astype(np.float32) / max_value(mode), alpha


def from_float(color: np.ndarray, mode: str, alpha: np.ndarray | None = None) -> np.ndarray:
    """Clip, round and re-attach alpha: the inverse of `to_float`."""
    top = max_value(mode)
    dtype = np.uint16 if mode == "I;16" else np.uint8
    quantised = np.clip(np.rint(color * top), 0, top).astype(dtype)
    if alpha is not None:
        quantised = np.concatenate([quantised, alpha[:, :, None].astype(dtype)], axis=2)
    elif quantised.shape[2] == 1:
        quantised = quantised[:, :, 0]
    return quantised
