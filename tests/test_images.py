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
    nowhere = images.decode({"bytes": None, "path": "x.png"})  # no dataset to resolve it in
    assert not nowhere.ok and "cannot be resolved" in nowhere.error


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
    assert decoded.error == ("cannot decode image: not one of the accepted formats (PNG, JPEG, TIFF, WEBP, BMP); "
                             "it starts with b'GIF89-no'")


def frames(count: int) -> list:
    return [Image.fromarray(np.full((16, 16), 40 * index, np.uint8)) for index in range(count)]


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_only_the_contract_formats_are_decoded():
    """EPS would run Ghostscript; GIF, ICO, PCX and the rest are formats Pillow reads but the
    data contract does not name: all fail, whatever Pillow could do with them."""
    for fmt in ("EPS", "GIF", "ICO", "PCX", "TGA"):
        data = saved(Image.fromarray(RGB if fmt != "EPS" else RGB[:16, :16]), fmt)
        decoded = images.decode(data)
        assert not decoded.ok and "not one of the accepted formats" in decoded.error, fmt


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_multi_frame_images_fail_and_say_so(fmt):
    first, *rest = frames(3)
    options = {"lossless": True} if fmt == "WEBP" else {}
    decoded = images.decode(saved(first, fmt, save_all=True, append_images=rest, **options))
    assert not decoded.ok and "3 frames" in decoded.error


def test_sixteen_bit_colour_keeps_sixteen_bits():
    rgb16 = rng.integers(0, 65536, (21, 34, 3), dtype=np.uint16)
    rgba16 = rng.integers(0, 65536, (21, 34, 4), dtype=np.uint16)
    for pixels, mode in ((rgb16, "RGB;16"), (rgba16, "RGBA;16")):
        decoded = images.decode(images.encode_png(pixels, mode))
        assert decoded.ok and decoded.mode == mode and decoded.pixels.dtype == np.uint16
        np.testing.assert_array_equal(decoded.pixels, pixels)
        color, alpha = images.to_float(pixels, mode)
        np.testing.assert_array_equal(images.from_float(color, mode, alpha), pixels)
    import cv2

    tiff = cv2.imencode(".tiff", rgb16[:, :, ::-1])[1].tobytes()  # 48-bit TIFF as cameras and scanners write it
    decoded = images.decode(tiff)
    assert decoded.mode == "RGB;16"
    np.testing.assert_array_equal(decoded.pixels, rgb16)


def displayed(data: bytes) -> np.ndarray:
    """The pixels as a viewer shows them: EXIF orientation applied."""
    from PIL import ImageOps

    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize("orientation", [3, 6])
def test_the_output_displays_the_way_the_input_did(fmt, orientation):
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    data = saved(Image.fromarray(RGB), fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
    decoded = images.decode(data)
    out = images.encode_png(decoded.pixels, decoded.mode, orientation=decoded.orientation)
    if fmt == "JPEG":  # lossy: the same orientation and shape on screen
        assert decoded.orientation == orientation and displayed(out).shape == displayed(data).shape
        assert decoded.pixels.shape == RGB.shape  # pixels as stored, the tag carried
    else:
        np.testing.assert_array_equal(displayed(out), displayed(data))
    assert images.decode(images.encode_png(RGB, "RGB")).orientation is None


def test_image_paths_are_read_only_inside_the_dataset(tmp_path):
    dataset, outside = tmp_path / "dataset", tmp_path / "secret.png"
    (dataset / "images").mkdir(parents=True)
    (dataset / "images" / "a.png").write_bytes(images.encode_png(GRAY, "L"))
    outside.write_bytes(images.encode_png(GRAY, "L"))
    (dataset / "images" / "link.png").symlink_to(outside)
    assert images.decode({"bytes": None, "path": "images/a.png"}, base_dir=str(dataset)).ok
    assert images.decode({"bytes": None, "path": "images/../images/a.png"}, base_dir=str(dataset)).ok
    for path in ("../secret.png", "images/../../secret.png", str(outside), f"file://{outside}", "images/link.png",
                 "s3://other-bucket/secret.png", "~/secret.png"):
        decoded = images.decode({"bytes": None, "path": path}, base_dir=str(dataset))
        assert not decoded.ok and decoded.error.startswith("path outside the dataset"), path
    assert images.dataset_path("x/y.png", "s3://bucket/data") == "s3://bucket/data/x/y.png"
    assert images.dataset_path("s3://bucket/data/x.png", "s3://bucket/data") == "s3://bucket/data/x.png"
    assert images.dataset_path("s3://bucket/data2/x.png", "s3://bucket/data") is None


def test_image_path_reads_stop_at_the_byte_limit(tmp_path):
    (tmp_path / "big.png").write_bytes(images.encode_png(GRAY16, "I;16"))
    decoded = images.decode({"bytes": None, "path": "big.png"}, images.DecodeLimits(max_bytes=100), str(tmp_path))
    assert not decoded.ok and "larger than the limit of 100 bytes" in decoded.error


def test_struct_with_text_in_its_bytes_field_fails_the_row():
    decoded = images.decode({"bytes": "iVBORw0KGgo=", "path": None})
    assert not decoded.ok and "holds text" in decoded.error


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


@pytest.mark.parametrize("folder, suffix", [("BSD68", ".png"), ("CBSD68", ".png"), ("CBSD432", ".jpg")])
def test_decode_gives_pillows_pixels_and_every_level_encodes_them_exactly(folder, suffix):
    """The codecs chosen for speed (pipeline/images.py) against Pillow on the data users
    have: the same pixels in, and the exact pixels back out of every output PNG."""
    paths = sorted(p for p in shared_data(folder).iterdir() if p.suffix == suffix)[:3]
    for path in paths:
        data = path.read_bytes()
        decoded = images.decode(data)
        assert decoded.ok, decoded.error
        reference = Image.open(io.BytesIO(data))
        np.testing.assert_array_equal(decoded.pixels, np.asarray(reference))
        assert decoded.mode == reference.mode
        for level in (0, 1, 3, 9):
            png = images.encode_png(decoded.pixels, decoded.mode, compress_level=level)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), decoded.pixels)


def test_a_truncated_or_corrupt_png_fails_with_pillows_reason():
    png = images.encode_png(RGB, "RGB")
    truncated = images.decode(png[: len(png) // 2])
    assert not truncated.ok and "truncated" in truncated.error
    corrupt = bytearray(png)
    corrupt[len(png) // 2] ^= 0xFF
    broken = images.decode(bytes(corrupt))
    assert not broken.ok and broken.error.startswith("cannot decode image")


# --- inputs built to exhaust: each a failed row with its reason, never a stuck or failed job ------


def many_page_tiff(pages: int) -> bytes:
    """A little-endian TIFF of `pages` 1x1 gray pages chained IFD to IFD, all sharing one pixel."""
    entries = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (278, 3, 1), (279, 4, 1)]
    ifd_size = 2 + 12 * len(entries) + 4
    data = bytearray(b"II*\x00" + struct.pack("<I", 9) + b"\x80")  # header, first IFD at 9, the one pixel at 8
    for page in range(pages):
        following = 0 if page == pages - 1 else 9 + (page + 1) * ifd_size
        data += struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            data += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        data += struct.pack("<I", following)
    return bytes(data)


def test_a_tiff_of_sixty_thousand_pages_is_refused_after_reading_a_few(monkeypatch):
    """Pillow's n_frames walks every page (superlinearly: bench/README.md); the decoder looks
    at no more pages than it needs to say the image has several."""
    from PIL import TiffImagePlugin

    pages_read = []
    real_seek = TiffImagePlugin.TiffImageFile._seek
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_seek",
                        lambda self, frame: pages_read.append(frame) or real_seek(self, frame))
    decoded = images.decode(many_page_tiff(60_000), images.DecodeLimits(min_side=1))
    assert not decoded.ok and "more than 16 frames" in decoded.error
    assert len(pages_read) <= 2 * images.MAX_FRAMES_COUNTED
    assert "3 frames" in images.decode(many_page_tiff(3), images.DecodeLimits(min_side=1)).error


@pytest.mark.parametrize("value", [10**13, 2.5, True])
def test_an_image_struct_whose_bytes_are_a_number_fails_its_row_without_allocating(value):
    data, reason = images.image_bytes({"bytes": value, "path": None})
    assert data is None and f"bytes field is a {type(value).__name__}" in reason
    assert not images.is_image_type(pa.struct([("bytes", pa.int64()), ("path", pa.string())]))  # and stops the job
    assert not images.is_image_type(pa.struct([("bytes", pa.float64())]))
    assert images.is_image_type(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def test_image_paths_that_no_retry_can_open_fail_their_row_at_once(tmp_path):
    """A NUL byte, a name longer than the OS allows, a symbolic link loop: the row fails with
    its reason on the first try (the storage retry budget is for outages, not for bad names)."""
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    for path, said in (("a\x00b.png", "NUL byte"), ("x" * 5000 + ".png", "too long"),
                       ("loop-a", "symbolic links")):
        decoded = images.decode({"bytes": None, "path": path}, base_dir=str(tmp_path))
        assert not decoded.ok and said in decoded.error, decoded.error
        assert "attempts" not in decoded.error  # refused on the first try, not after the retry budget


def png_gray_alpha_16(pixels: np.ndarray) -> bytes:
    """A 16-bit gray + alpha PNG (colour type 4), written by hand as a camera or a scanner would."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width = pixels.shape[:2]
    raw = b"".join(b"\0" + pixels[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_sixteen_bit_gray_with_alpha_stays_sixteen_bit_gray_with_alpha():
    pixels = rng.integers(0, 65536, (21, 34, 2), dtype=np.uint16)
    decoded = images.decode(png_gray_alpha_16(pixels))
    assert decoded.ok and decoded.mode == "LA;16" and decoded.pixels.dtype == np.uint16
    np.testing.assert_array_equal(decoded.pixels, pixels)
    color, alpha = images.to_float(decoded.pixels, decoded.mode)
    assert color.shape == (21, 34, 1)
    written = images.encode_png(images.from_float(color, decoded.mode, alpha), decoded.mode)
    assert (written[24], written[25]) == (16, 4)  # bit depth 16, colour type gray + alpha
    np.testing.assert_array_equal(images.decode(written).pixels, pixels)
