"""Images in Parquet: the data contract (docs/architecture.md), decoding with limits, lossless encoding.

An image value is either raw encoded bytes (PNG, JPEG, TIFF, WebP, BMP) or the Hugging
Face `datasets` layout struct<bytes: binary, path: string>. Decoding never raises for a
bad image: `decode` returns a `Decoded` with `error` set, so one corrupt row becomes one
`failed` row and the rest of the batch goes on (errors are values at row level, exceptions at job level).

Only the formats of the data contract are decoded (PNG, JPEG, TIFF, WebP, BMP); anything
else Pillow could open (EPS, which calls Ghostscript, GIF, PSD, ...) is a failed row, as is a
multi-frame image (animated PNG or WebP, multi-page TIFF). A Hugging Face value without
bytes is read from its `path` only when that path lies inside the dataset (`dataset_path`).

Pixel arrays keep the input's mode and depth:
    L        uint8  (H, W)        gray
    I;16     uint16 (H, W)        16-bit gray
    RGB      uint8  (H, W, 3)
    RGBA     uint8  (H, W, 4)     alpha is carried through untouched
    LA       uint8  (H, W, 2)     gray + alpha
    RGB;16   uint16 (H, W, 3)     16-bit colour (PNG, TIFF), which Pillow would cut to 8 bits
    RGBA;16  uint16 (H, W, 4)
    LA;16    uint16 (H, W, 2)   16-bit gray + alpha
Palette and 1-bit images are expanded to RGB(A) / L, since a restored image is no longer
limited to a palette. The EXIF orientation is kept beside the pixels (which stay as
stored), so the output PNG carries the same tag and a viewer shows it the same way (8-bit
TIFF is the exception: Pillow turns its pixels upright while loading, so the output holds
them upright, untagged).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile

from pipeline.contract import DecodeLimits, ImageColumns, transient

# Pillow's own bomb check warns at ~89 MP and raises at ~179 MP; resflow checks the
# declared size against its own limit before decoding, so Pillow's check is turned off.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey stripe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
ACCEPTED_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP", "BMP")  # Pillow's names for the data contract's formats
SIXTEEN_BIT_MODES = ("I;16", "LA;16", "RGB;16", "RGBA;16")
EXIF_ORIENTATION = 0x0112


class SchemaError(ValueError):
    """A dataset whose columns do not follow the data contract: stops a job before it starts."""


@dataclass
class Decoded:
    pixels: np.ndarray | None  # None when decoding failed
    mode: str = ""
    format: str = ""
    error: str | None = None
    orientation: int | None = None  # EXIF orientation 2-8 when the input had one (1, the default, is left out)
    data: bytes | None = None  # the encoded bytes as read: a row left untouched carries them to the output
    too_small: bool = False  # a valid image under `min_side`: too little to restore, not broken (error says so)

    @property
    def ok(self) -> bool:
        return self.error is None


def is_image_type(data_type: pa.DataType) -> bool:
    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
        return True
    if pa.types.is_struct(data_type):  # the Hugging Face Image layout: bytes (binary; text fails its rows), path
        fields = {data_type.field(i).name: data_type.field(i).type for i in range(data_type.num_fields)}
        return ("bytes" in fields and _is_bytes_or_text(fields["bytes"])
                and ("path" not in fields or pa.types.is_string(fields["path"]) or pa.types.is_large_string(fields["path"])))
    return False


def _is_bytes_or_text(data_type: pa.DataType) -> bool:
    return any(check(data_type) for check in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string,
                                              pa.types.is_large_string))


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


def dataset_path(path: str, base: str) -> str | None:
    """The URI an image `path` names inside the dataset at `base`, or None when it would
    leave it: absolute paths, other schemes or buckets, `..` out of the base, and (locally)
    symbolic links that point outside it are all refused."""
    from pipeline import storage

    if "://" in path:
        candidate = path
    elif path.startswith(("/", "\\", "~")) or (len(path) > 1 and path[1] == ":"):
        return None
    else:
        candidate = storage.join(base, path)
    try:
        return candidate if storage.contains(base, candidate) else None
    except storage.StorageError:  # an unsupported scheme
        return None


def image_bytes(value, base_dir: str | None = None, max_bytes: int | None = None) -> tuple[bytes | None, str | None]:
    """The encoded bytes of an image cell, or (None, reason).

    A Hugging Face Image cell built from file paths stores bytes=None and only a path;
    such a path is read, at most `max_bytes` of it, only when it lies inside `base_dir`
    (the dataset's own location). A refused path is never opened, so nothing of what it
    names can reach an error message, a log or an output."""
    if value is None:
        return None, "the image value is null"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, str):
            return None, "the image struct's bytes field holds text, not binary image data"
        if isinstance(data, (bytes, bytearray, memoryview)):
            return bytes(data), None
        if data is not None:  # bytes(n) of an integer would allocate n bytes before any limit
            return None, f"the image struct's bytes field is a {type(data).__name__}, not binary image data"
        path = value.get("path")
        if not path:
            return None, "the image struct has neither bytes nor a path"
        if not isinstance(path, str):
            return None, f"the image struct's path is a {type(path).__name__}, not a string"
        if "\x00" in path:  # no file system takes one; resolving it would raise for the whole batch
            return None, f"the image struct's path {path!r} holds a NUL byte"
        if base_dir is None:
            return None, f"the image struct has no bytes and its path {path!r} cannot be resolved here"
        uri = dataset_path(path, base_dir)
        if uri is None:
            return None, f"path outside the dataset: {path!r} (image paths are read only inside {base_dir})"
        from pipeline import storage

        try:
            return storage.read_bytes(uri, max_bytes=max_bytes), None
        except ValueError:
            return None, f"the image file {path!r} is larger than the limit of {max_bytes} bytes"
        except Exception as error:  # the row fails, not the batch
            reason = f"the image struct has no bytes and its path {path!r} could not be read: {error}"
            return None, transient(reason) if read_can_pass(error) else reason
    return None, f"unsupported image value of type {type(value).__name__}"


def read_can_pass(error: BaseException) -> bool:
    """Whether a referenced file that could not be read may read later: missing (not there
    yet), not permitted, the store down past its retries; not a path that no file system
    takes (too long, a link loop) nor one that names a folder."""
    from pipeline import storage

    if isinstance(error, (IsADirectoryError, NotADirectoryError)):
        return False
    return not (isinstance(error, OSError) and error.errno in storage.DETERMINISTIC_ERRNOS)


def declared_size(value) -> tuple[int, int] | None:
    """(width, height) as an encoded image's header declares it (reading the header only),
    or None when it cannot tell without more (a path to read, bytes that are not an image)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return None
    try:
        with Image.open(io.BytesIO(value), formats=ACCEPTED_FORMATS) as image:
            return image.size
    except Exception:
        return None


def declared_pixels(value) -> int:
    """The pixel count an encoded image's header declares, or 0 when it cannot tell."""
    size = declared_size(value)
    return size[0] * size[1] if size else 0


MAX_FRAMES_COUNTED = 16  # a multi-frame image is refused anyway: its message needs no exact count


def frame_count(image: Image.Image) -> int:
    """How many frames the image holds, counted up to MAX_FRAMES_COUNTED (one more means
    more). Pillow's `n_frames` walks every page of a TIFF, superlinearly: a TIFF of 64k
    pages cost over a minute a row (bench/README.md, "Inputs built to exhaust"); `is_animated`
    reads no further than page 2."""
    if not getattr(image, "is_animated", False):
        return 1
    if image.format != "TIFF":
        return image.n_frames  # PNG, WebP: read from a header chunk
    for frame in range(1, MAX_FRAMES_COUNTED + 1):
        try:
            image.seek(frame)
        except EOFError:
            return frame
    return MAX_FRAMES_COUNTED + 1


def decode(value, limits: DecodeLimits = DecodeLimits(), base_dir: str | None = None) -> Decoded:
    data, reason = image_bytes(value, base_dir, limits.max_bytes)
    if data is None:
        return Decoded(None, error=reason)
    if len(data) == 0:
        return Decoded(None, error="the image value is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        return Decoded(None, error=f"encoded image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)  # reads the header only
            width, height = image.size
            if width * height > limits.max_pixels:
                return Decoded(None, error=f"image declares {width}x{height} = {width * height} pixels, over the "
                                           f"limit of {limits.max_pixels} (decompression bomb guard; raise max_pixels to allow it)")
            frames = frame_count(image)
            if frames > 1:
                counted = f"more than {MAX_FRAMES_COUNTED}" if frames > MAX_FRAMES_COUNTED else str(frames)
                return Decoded(None, error=f"{image.format} image with {counted} frames: resflow restores single "
                                           f"images; store each frame as a row of its own")
            fmt = image.format or ""
            orientation = image.getexif().get(EXIF_ORIENTATION)
            fast = _decode_eight_bit_png(image, data)
            if fast is not None:
                pixels, mode = fast
            elif _is_sixteen_bit_colour(image, data):
                pixels, mode = _decode_sixteen_bit_colour(data)
            else:
                image.load()
                pixels, mode = _to_array(image)
                if fmt == "TIFF":  # Pillow turns TIFF pixels upright as it loads them: no tag left to carry
                    orientation = None
    except Image.UnidentifiedImageError:  # its message names the in-memory buffer's address, not the problem
        return Decoded(None, error=f"cannot decode image: not one of the accepted formats "
                                   f"({', '.join(ACCEPTED_FORMATS)}); it starts with {data[:8]!r}")
    except Exception as error:
        return Decoded(None, error=f"cannot decode image: {type(error).__name__}: {error}")
    if min(width, height) < limits.min_side:  # decoded all the same: a tiny image that is broken is a failure
        return Decoded(None, mode, fmt, error=f"image is {width}x{height} pixels, smaller than the minimum "
                                              f"{limits.min_side}x{limits.min_side}", data=data, too_small=True)
    return Decoded(pixels, mode, fmt, orientation=orientation if orientation in range(2, 9) else None, data=data)


def _is_sixteen_bit_colour(image: Image.Image, data: bytes) -> bool:
    """Pillow opens 16-bit colour (and gray + alpha) PNG and TIFF as 8-bit RGB(A); tell them apart by header."""
    if image.format == "PNG" and data[12:16] == b"IHDR":
        return data[24] == 16 and data[25] in (2, 4, 6)  # bit depth, colour type RGB / gray + alpha / RGBA
    if image.format == "TIFF":
        bits = image.tag_v2.get(258) or (8,)
        samples = image.tag_v2.get(277) or 1
        return max(bits if isinstance(bits, tuple) else (bits,)) == 16 and samples >= 3
    return False


def _decode_eight_bit_png(image: Image.Image, data: bytes) -> tuple[np.ndarray, str] | None:
    """An 8-bit gray, RGB or RGBA PNG decoded by OpenCV (libpng), 1.1-1.5x Pillow's speed
    with the same pixels (bench/README.md, "PNG codecs"); None for every other image, and
    for one OpenCV cannot decode (truncated, corrupt), which Pillow then decodes or fails
    with its own reason."""
    if image.format != "PNG" or image.mode not in ("L", "RGB", "RGBA") or "transparency" in image.info:
        return None
    if data[12:16] != b"IHDR" or data[24] != 8:  # bit depth 8: OpenCV would rescale 1, 2 and 4 bits
        return None
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[image.mode]
    if pixels is None or pixels.dtype != np.uint8 or (pixels.shape[2] if pixels.ndim == 3 else 1) != channels:
        return None
    if channels > 1:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGRA2RGBA)
    return pixels, image.mode


def _decode_sixteen_bit_colour(data: bytes) -> tuple[np.ndarray, str]:
    import cv2  # Pillow cannot hold 16-bit colour; OpenCV decodes it exactly

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError("a 16-bit colour image that could not be decoded as 3 or 4 channels")
    if data[12:16] == b"IHDR" and data[25] == 4:  # gray + alpha, which OpenCV spreads over B, G and R
        return np.ascontiguousarray(pixels[:, :, [0, 3]]), "LA;16"
    order = [2, 1, 0] if pixels.shape[2] == 3 else [2, 1, 0, 3]  # BGR(A) -> RGB(A)
    return np.ascontiguousarray(pixels[:, :, order]), "RGB;16" if pixels.shape[2] == 3 else "RGBA;16"


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


# Modes OpenCV writes (as BGR(A) in its channel order): 1.2-1.5x Pillow's speed at the
# same level, lossless either way (bench/README.md, "PNG codecs"); Pillow writes LA, and
# `_encode_gray_alpha_16` LA;16, which neither writes.
CV2_PNG_ORDER = {"L": None, "I;16": None, "RGB": [2, 1, 0], "RGBA": [2, 1, 0, 3], "RGB;16": [2, 1, 0],
                 "RGBA;16": [2, 1, 0, 3]}


def encode_png(pixels: np.ndarray, mode: str, compress_level: int = 3, orientation: int | None = None) -> bytes:
    """Lossless PNG in the given mode, carrying an EXIF orientation when given; `compress_level`
    is zlib's (RestoreSettings.png_compress_level says which pays)."""
    if mode == "LA;16":
        png = _encode_gray_alpha_16(pixels, compress_level)
    elif mode in CV2_PNG_ORDER:
        import cv2

        dtype = np.uint16 if mode in SIXTEEN_BIT_MODES else np.uint8
        order = CV2_PNG_ORDER[mode]
        array = np.ascontiguousarray(pixels if order is None else pixels[:, :, order], dtype=dtype)
        ok, encoded = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
        if not ok:
            raise ValueError(f"OpenCV could not encode a {mode} PNG")
        png = encoded.tobytes()
    else:
        image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode=mode)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=compress_level)
        png = buffer.getvalue()
    return _with_orientation(png, orientation) if orientation else png


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _encode_gray_alpha_16(pixels: np.ndarray, compress_level: int) -> bytes:
    """16-bit gray + alpha PNG (colour type 4), which neither Pillow nor OpenCV writes:
    big-endian samples, each scanline unfiltered."""
    height, width = pixels.shape[:2]
    samples = np.ascontiguousarray(pixels, dtype=">u2").view(np.uint8).reshape(height, width * 4)  # 2 samples x 2 bytes
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), samples], axis=1)  # filter type 0 first
    header = struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0)  # depth, colour type, compression, filter, interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), compress_level)) + _png_chunk(b"IEND", b""))


def _with_orientation(png: bytes, orientation: int) -> bytes:
    """Insert an eXIf chunk holding only the orientation tag right after IHDR."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    payload = exif.tobytes()
    payload = payload[6:] if payload.startswith(b"Exif\x00\x00") else payload  # PNG stores the bare TIFF header
    chunk = _png_chunk(b"eXIf", payload)
    end_of_header = 8 + 8 + 13 + 4  # signature, IHDR length + type, its 13 bytes, CRC
    return png[:end_of_header] + chunk + png[end_of_header:]


# --- pixels <-> float, the representation models work in ----------------------------------


def max_value(mode: str) -> float:
    return 65535.0 if mode in SIXTEEN_BIT_MODES else 255.0


def color_channels(mode: str) -> int:
    """How many channels a restoration model sees (alpha is not restored)."""
    return 3 if mode in ("RGB", "RGBA", "RGB;16", "RGBA;16") else 1


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
    dtype = np.uint16 if mode in SIXTEEN_BIT_MODES else np.uint8
    quantised = np.clip(np.rint(color * top), 0, top).astype(dtype)
    if alpha is not None:
        quantised = np.concatenate([quantised, alpha[:, :, None].astype(dtype)], axis=2)
    elif quantised.shape[2] == 1:
        quantised = quantised[:, :, 0]
    return quantised
