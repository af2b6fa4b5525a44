"""The loop a user would write, as the reference `resflow restore` is measured against.

    python -m bench.plain_loop --input s3://resflow/noisy --output s3://resflow/loop-out --model ./model
    OMP_NUM_THREADS=1 python -m bench.plain_loop ... --threads 1     # the one-core loop

One process, one image at a time: read each Parquet file with pyarrow, decode with Pillow,
the whole image through the network under `torch.autocast("cpu", torch.bfloat16)` where
the CPU computes bf16 natively (plain float32 elsewhere), clip and round to 8 bits, encode
PNG with Pillow, write the file back with pyarrow. No batching, no tiles, no threads of its
own, no manifest: the simplest correct thing, written without resflow's machinery (only
its model file format, to load the weights). Gray and RGB 8-bit images only.

Prints one JSON line: images, megapixels, seconds from the first file's read to the last
file's write, and the rate after the first file (its start-up: the first forward pass
picks oneDNN's kernels). The caller times the process itself, Python and torch start
included.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.modelio import load_model


def bf16_native() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow's own filesystem for a path or s3:// URI (AWS_ENDPOINT_URL and the AWS
    credentials come from the environment, as a user's script would take them)."""
    import os

    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        scheme, _, host = endpoint.partition("://")
        s3 = pyarrow.fs.S3FileSystem(endpoint_override=host or None, scheme=scheme or "https",
                                     region=os.environ.get("AWS_REGION", "us-east-1"))
        return s3, uri[len("s3://"):]
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(uri)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core)")
    parser.add_argument("--compress-level", type=int, default=1, help="PNG compression level (Pillow's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    model.eval()
    autocast = bf16_native()
    fs_in, base_in = filesystem(args.input)
    fs_out, base_out = filesystem(args.output)
    files = sorted(info.path for info in fs_in.get_file_info(pyarrow.fs.FileSelector(base_in, recursive=True))
                   if info.path.endswith(".parquet"))
    started = time.perf_counter()
    first_file_done, first_file_megapixels = None, 0.0
    images = 0
    megapixels = 0.0
    for path in files:
        table = pq.read_table(path, filesystem=fs_in)
        restored = []
        for value in table.column("image").to_pylist():
            data = value["bytes"] if isinstance(value, dict) else value
            image = Image.open(io.BytesIO(data))
            mode = image.mode
            pixels = np.asarray(image, dtype=np.float32) / 255.0
            chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(torch.from_numpy(np.ascontiguousarray(chw))[None])
            out = out[0].float().numpy()
            out = out[0] if out.shape[0] == 1 else out.transpose(1, 2, 0)
            quantised = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(quantised, mode=mode).save(buffer, format="PNG", compress_level=args.compress_level)
            restored.append(buffer.getvalue())
            images += 1
            megapixels += pixels.shape[0] * pixels.shape[1] / 1e6
        table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(restored, pa.binary()))
        relative = path[len(base_in):].lstrip("/")
        pq.write_table(table, f"{base_out.rstrip('/')}/{relative}", filesystem=fs_out)
        if first_file_done is None:
            first_file_done, first_file_megapixels = time.perf_counter(), megapixels
    seconds = time.perf_counter() - started
    steady_seconds = time.perf_counter() - first_file_done if first_file_done else 0.0
    print(json.dumps({"images": images, "megapixels": megapixels, "seconds": seconds, "bf16": autocast,
                      "mp_per_s": megapixels / seconds if seconds else 0.0,
                      "mp_per_s_after_first_file": ((megapixels - first_file_megapixels) / steady_seconds
                                                    if steady_seconds > 0 else 0.0)}), flush=True)


if __name__ == "__main__":
    main()
