"""PNG codecs on the data users have: which library decodes and encodes, at which level.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.png_codecs

One core. Decode: BSD68 (8-bit gray PNG), CBSD68 (RGB PNG), CBSD432 (JPEG), with Pillow,
OpenCV and, when installed, imagecodecs and pyspng. Encode: the clean images (a restored
image is close to its clean original) as PNG at zlib levels 1, 2, 3 and 6 with Pillow and
OpenCV (and imagecodecs): MP/s and bytes per pixel. Every codec's pixels are checked
against Pillow's (decode) or the input (encode). Each figure is the best of three passes,
the codecs interleaved, so a busy moment on a shared machine costs every codec alike.
Writes bench/results/png_codecs.json.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
LEVELS = (1, 2, 3, 6)


def optional(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


def rgb_swap(array: np.ndarray) -> np.ndarray:
    return array if array.ndim == 2 else np.ascontiguousarray(array[:, :, ::-1])


def decoders(png: bool) -> dict:
    found = {"pillow": lambda data: np.asarray(Image.open(io.BytesIO(data))),
             "opencv": lambda data: rgb_swap(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED))}
    imagecodecs, pyspng = optional("imagecodecs"), optional("pyspng")
    if imagecodecs:
        found["imagecodecs"] = imagecodecs.png_decode if png else imagecodecs.jpeg8_decode
    if pyspng and png:
        found["pyspng"] = pyspng.load
    return found


def encoders(level: int) -> dict:
    def pillow(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    found = {"pillow": pillow,
             "opencv": lambda array: cv2.imencode(".png", rgb_swap(array), [cv2.IMWRITE_PNG_COMPRESSION, level])[1].tobytes()}
    imagecodecs = optional("imagecodecs")
    if imagecodecs:
        found["imagecodecs"] = lambda array: imagecodecs.png_encode(array, level=level)
    return found


def best_of_three(functions: dict, items: list) -> dict:
    seconds = {name: float("inf") for name in functions}
    for _ in range(3):
        for name, function in functions.items():
            started = time.perf_counter()
            for item in items:
                function(item)
            seconds[name] = min(seconds[name], time.perf_counter() - started)
    return seconds


def main() -> None:
    cv2.setNumThreads(1)
    result = {}
    for folder, suffix in (("BSD68", ".png"), ("CBSD68", ".png"), ("CBSD432", ".jpg")):
        datas = [path.read_bytes() for path in sorted((DATA / folder).iterdir()) if path.suffix == suffix][:68]
        reference = [np.asarray(Image.open(io.BytesIO(data))) for data in datas]
        megapixels = sum(array.shape[0] * array.shape[1] for array in reference) / 1e6
        entry = result[folder] = {"images": len(datas), "megapixels": megapixels, "decode": {}, "encode": {}}
        functions = decoders(suffix == ".png")
        for name, seconds in best_of_three(functions, datas).items():
            exact = all(np.array_equal(functions[name](data), want) for data, want in zip(datas[:8], reference))
            entry["decode"][name] = {"mp_per_s": megapixels / seconds, "exact": exact}
            print(f"{folder} decode {name:12s} {megapixels / seconds:6.1f} MP/s{'' if exact else '  NOT EXACT'}")
        if suffix != ".png":
            continue
        for level in LEVELS:
            functions = encoders(level)
            for name, seconds in best_of_three(functions, reference).items():
                encoded = [functions[name](array) for array in reference]
                exact = all(np.array_equal(np.asarray(Image.open(io.BytesIO(png))), want)
                            for png, want in zip(encoded[:8], reference))
                bytes_per_pixel = sum(len(png) for png in encoded) / (megapixels * 1e6)
                entry["encode"][f"{name} level {level}"] = {"mp_per_s": megapixels / seconds,
                                                            "bytes_per_pixel": bytes_per_pixel, "exact": exact}
                print(f"{folder} encode {name:12s} level {level}: {megapixels / seconds:6.1f} MP/s, "
                      f"{bytes_per_pixel:.3f} bytes/pixel{'' if exact else '  NOT EXACT'}", flush=True)
    out = REPO / "bench" / "results" / "png_codecs.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
