import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import images
from tests.conftest import shared_data


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but holds almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


rng = np.random.default_rng(0)
GRAY = rng.integers(0, 256, (33, 47), dtype=np.uint8)
RGB = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
RGBA = rng.integers(0, 256, (33, 47, 4), dtype=np.uint8)
GRAY16 = rng.integers(0, 65536, (33, 47), dtype=np.uint16)


@pytest.mark.parametrize("pixels, mode", [(GRAY, "L"), (RGB, "RGB"), (RGBA, "RGBA"), (GRAY16, "I;16"),
                                          (rng.integers(0, 256, (33, 47, 2), dtype=np.uint8), "LA")])
def test_png_round_trip_keeps_mode_and_depth(pixels, mode):
    decoded = images.decode(images.encode_png(pixels, mode))
    assert decoded.ok, decoded.error
    assert decoded.mode == mode and decoded.pixels.dtype == pixels.dtype
    np.testing.assert_array_equal(decoded.pixels, pixels)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP", "BMP"])
def test_lossless_formats_decode_exactly(fmt):
    options = {"lossless": True} if fmt == "WEBP" else {}
    decoded = images.decode(encode(RGB, fmt, **options))
    assert decoded.ok, decoded.error
    np.testing.assert_array_equal(decoded.pixels, RGB)


def test_jpeg_and_16bit_tiff_decode():
    jpeg = images.decode(encode(GRAY, "JPEG", quality=95))
    assert jpeg.ok and jpeg.mode == "L" and np.abs(jpeg.pixels.astype(int) - GRAY).mean() < 12
    tiff16 = images.decode(encode(GRAY16, "TIFF"))
    assert tiff16.ok and tiff16.mode == "I;16"
    np.testing.assert_array_equal(tiff16.pixels, GRAY16)


def test_palette_expands_to_rgb():
    palette = Image.fromarray(RGB).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    decoded = images.decode(buffer.getvalue())
    assert decoded.ok and decoded.mode == "RGB" and decoded.pixels.shape == (33, 47, 3)


def test_hugging_face_struct_with_bytes_and_with_path(tmp_path):
    data = images.encode_png(GRAY, "L")
    assert images.decode({"bytes": data, "path": "x.png"}).ok
    (tmp_path / "x.png").write_bytes(data)
    from_path = images.decode({"bytes": None, "path": "x.png"}, base_dir=str(tmp_path))
    np.testing.assert_array_equal(from_path.pixels, GRAY)
    missing = images.decode({"bytes": None, "path": "nope.png"}, base_dir=str(tmp_path))
    assert not missing.ok and "nope.png" in missing.error


def bad_values():
    good = (shared_data("Set12") / "01.png").read_bytes()
    return {
        "corrupt bytes": (b"this is not an image at all" * 10, "cannot decode"),
        "empty value": (b"", "empty"),
        "null value": (None, "null"),
        "truncated PNG": (good[: len(good) // 2], "cannot decode"),
        "1x1 image": (encode(np.zeros((1, 1), np.uint8), "PNG"), "smaller than the minimum"),
        "declares 100000 x 100000": (png_header_only(100_000, 100_000), "decompression bomb"),
    }


@pytest.mark.parametrize("name", list(bad_values()))
def test_bad_values_fail_with_a_reason(name):
    value, reason = bad_values()[name]
    decoded = images.decode(value)
    assert not decoded.ok and decoded.pixels is None
    assert reason in decoded.error
    assert "object at 0x" not in decoded.error  # the same bad row reads the same in every run


def test_unknown_format_says_what_the_bytes_start_with():
    decoded = images.decode(b"GIF89-not-really" * 8)
    assert decoded.error == "cannot decode image: not a format Pillow reads (starts with b'GIF89-no')"


def test_bomb_is_rejected_before_decoding():
    # 100000 x 100000 x 1 byte would need 10 GB; it must be refused from the header alone.
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert not images.decode(png_header_only(100_000, 100_000)).ok
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_float_round_trip_keeps_alpha_untouched():
    color, alpha = images.to_float(RGBA, "RGBA")
    assert color.shape == (33, 47, 3) and color.dtype == np.float32 and color.max() <= 1
    np.testing.assert_array_equal(images.from_float(color, "RGBA", alpha), RGBA)
    color16, _ = images.to_float(GRAY16, "I;16")
    np.testing.assert_array_equal(images.from_float(color16, "I;16"), GRAY16)


def test_validate_schema_names_the_problem():
    good = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("extra", pa.int32())])
    images.validate_schema(good)
    hf = pa.schema([("image_id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    images.validate_schema(hf)
    with pytest.raises(images.SchemaError, match="no image column 'image'"):
        images.validate_schema(pa.schema([("image_id", pa.string()), ("picture", pa.binary())]))
    with pytest.raises(images.SchemaError, match="'image' has type int64"):
        images.validate_schema(pa.schema([("image_id", pa.string()), ("image", pa.int64())]))
    with pytest.raises(images.SchemaError, match="no image column 'target'"):
        images.validate_schema(good, need_target=True)
