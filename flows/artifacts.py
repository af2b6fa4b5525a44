"""What a run leaves in the Prefect UI: metric tables, a markdown summary with before/after
previews embedded as small JPEG data URIs (the UI renders them without access to the
bucket), links to the outputs, and a progress bar during a long restore.

The quality sample: where the restored rows carry a clean `target` (a paired dataset),
PSNR/SSIM before and after are computed on the first `sample` images, so a nightly run
over a large dataset does not read it all twice.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from pipeline import metrics, storage
from pipeline.dataset import read_table
from pipeline.images import ImageColumns, decode
from pipeline.manifest import Manifest
from pipeline.noise import noise_summary
from pipeline.restore.records import FileEntry

PREVIEW_SIDE = 256  # px; 10-40 KB per JPEG keeps the artifact page fast


def jpeg_data_uri(pixels: np.ndarray, side: int = PREVIEW_SIDE) -> str:
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4):  # drop alpha: JPEG has none
        pixels = pixels[..., :-1]
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    image = Image.fromarray(pixels)
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def sample_restored(output: str, count: int, only: set[str] | None = None,
                    columns: ImageColumns = ImageColumns(), input_root: str | None = None) -> list[dict]:
    """Up to `count` restored rows (of the output files in `only`, else of all) with their
    input image and, for paired input, the clean target: image_id, before, after, target.
    Input and output rows are paired by position (an output file holds its input's rows in
    order), never by id, which need not be unique."""
    rows: list[dict] = []
    entries = [FileEntry.from_json(record) for record in Manifest(output, "manifest").all().values()]
    for entry in sorted((entry for entry in entries if entry is not None), key=lambda entry: entry.output):
        if only is not None and entry.output not in only:
            continue
        if len(rows) >= count:
            break
        restored = read_table(entry.output)
        wanted = [name for name in (columns.id, columns.image, columns.target, "noise_sigma")
                  if name in restored.schema.names]
        restored = restored.select(wanted + ["status"]).append_column("_row", pa.array(range(restored.num_rows)))
        restored = restored.filter(pc.equal(restored.column("status"), "ok")).slice(0, count - len(rows))
        if restored.num_rows == 0:
            continue
        before = read_table(entry.input, columns=[columns.image]).column(columns.image)
        has_target = columns.target in restored.schema.names
        for record in restored.to_pylist():
            rows.append({
                "image_id": record[columns.id],
                "before": decode(before[record["_row"]].as_py(), base_dir=input_root).pixels,
                "after": decode(record[columns.image]).pixels,
                "target": decode(record[columns.target]).pixels if has_target and record[columns.target] else None,
                "noise_sigma": record.get("noise_sigma"),  # the input's estimate (pipeline/noise.py)
            })
    return rows


def quality(rows: list[dict]) -> dict:
    """Mean PSNR/SSIM before and after over the rows that have a clean target
    (metrics.score_restoration, the library's one scoring path)."""
    scored = [row for row in rows if row["target"] is not None and row["before"] is not None
              and row["target"].shape == row["after"].shape == row["before"].shape]
    if not scored:
        return {}
    scores = [metrics.score_restoration(row["target"], row["before"], row["after"],
                                        65535.0 if row["target"].dtype == np.uint16 else 255.0) for row in scored]

    def mean(key: str) -> float:
        return float(np.mean([score[key] for score in scores]))

    return {"scored_images": len(scored), "psnr_before": mean("input_psnr"), "psnr_after": mean("output_psnr"),
            "ssim_before": mean("input_ssim"), "ssim_after": mean("output_ssim")}


def previews_markdown(rows: list[dict]) -> str:
    if not rows:
        return "_no restored images to preview_"
    lines = ["| image | estimated noise sigma | before | after |", "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| `{row['image_id']}` | {_sigma_text(row.get('noise_sigma'))} "
                     f"| ![before {row['image_id']}]({jpeg_data_uri(row['before'])}) "
                     f"| ![after {row['image_id']}]({jpeg_data_uri(row['after'])}) |")
    return "\n".join(lines)


def per_image_noise_markdown(rows: list[dict]) -> str:
    """Each sampled image's estimated noise: what a real noisy photograph (no clean
    reference, e.g. RNI15) says about itself."""
    lines = ["| image | estimated noise sigma (0-255) |", "| --- | --- |"]
    lines += [f"| `{row['image_id']}` | {_sigma_text(row.get('noise_sigma'))} |" for row in rows]
    return "\n".join(lines)


def _sigma_text(sigma: float | None) -> str:
    return "n/a" if sigma is None else f"{sigma:.1f}"


def restore_artifacts(report: dict, input_uri: str, model: str, previews: int, sample: int) -> dict:
    """Table, markdown summary with previews, and a link; returns the metrics row."""
    rows = (sample_restored(report["output"], max(previews, sample), only=set(report["outputs"]), input_root=input_uri)
            if report.get("files_restored") else [])
    scores = quality(rows[:sample])
    noise = noise_summary(report["noise_sigma_counts"])
    row = {"model_version": report["model_version"], "files_restored": report["files_restored"],
           "files_skipped": report["files_skipped"], "images_ok": report["images_ok"],
           "images_failed": report["images_failed"],
           # failed for a reason in the data (stays failed) or one that can pass (the next run retries it)
           "images_failed_data": report["images_failed"] - report.get("images_failed_transient", 0),
           "images_failed_transient": report.get("images_failed_transient", 0),
           "images_retried": report.get("images_retried", 0), "images_skipped": report["images_skipped"],
           "noise_sigma_median": None if noise["median"] is None else round(noise["median"], 2),
           "megapixels": round(report["megapixels"], 2),
           "megapixels_per_s": round(report["megapixels_per_s"], 3), "seconds": round(report["seconds"], 1),
           **{key: round(value, 4) for key, value in scores.items()}}
    create_table_artifact([row], key="restore-metrics", description=f"Restore of {input_uri}")
    quality_line = (f"PSNR {scores['psnr_before']:.2f} → **{scores['psnr_after']:.2f} dB**, SSIM "
                    f"{scores['ssim_before']:.4f} → **{scores['ssim_after']:.4f}** (first {scores['scored_images']} "
                    f"images against their clean target)" if scores else "no clean reference in this dataset")
    failures = "\n".join(f"- `{image_id}`: {reason}" for image_id, reason in report.get("failures", [])[:10])
    markdown = "\n\n".join(filter(None, [
        f"# Restore: {report['images_ok']} ok, {report['images_skipped']} skipped, {report['images_failed']} failed "
        f"({row['images_failed_data']} for a reason in the data, {row['images_failed_transient']} for one that can "
        f"pass: the next run retries those)",
        (f"> retried {report['images_retried']} row(s) of {report['files_retried']} file(s) that an earlier run "
         f"failed for a reason that can pass; their other rows were kept" if report.get("images_retried") else ""),
        f"- input: `{input_uri}`\n- output: `{report['output']}`\n- model: `{report['model_version']}` (from `{model}`)"
        f"\n- files restored: {report['files_restored']}, already done: {report['files_skipped']}"
        f"\n- {report['megapixels']:.1f} MP in {report['seconds']:.1f} s = {report['megapixels_per_s']:.3f} MP/s"
        f"\n- quality: {quality_line}",
        f"## Estimated noise\n{noise_markdown(noise)}",
        (f"## Estimated noise per image (the first {len(rows)} restored)\n{per_image_noise_markdown(rows)}"
         if rows else ""),
        (f"> note: the model is gray: {report['images_per_channel']} colour image(s) were restored one channel at "
         f"a time, which ignores the correlation between channels; a colour model restores them jointly"
         if report.get("images_per_channel") else ""),
        f"## Failed rows\n{failures}" if failures else "",
        f"## Before / after\n{previews_markdown(rows[:previews])}",
    ]))
    create_markdown_artifact(markdown, key="restore-summary", description="Restore summary with previews")
    create_link_artifact(_browsable(report["output"]), link_text=report["output"], key="restore-output",
                         description="Restored Parquet files")
    return row


def noise_markdown(noise: dict) -> str:
    """The run's estimated noise (`pipeline.noise.noise_summary`) as a small table."""
    if not noise["images"]:
        return "_no image was read in this run_"
    lines = [f"Median sigma {noise['median']:.1f} (0-255 scale) over {noise['images']} images.", "",
             "| sigma | images |", "| --- | --- |"]
    lines += [f"| {label} | {count} |" for label, count in noise["bins"]]
    return "\n".join(lines)


def _browsable(uri: str) -> str:
    """An http(s) address for an s3:// prefix when the endpoint is known, else the URI."""
    location = storage.parse(uri)
    settings = storage.S3Settings.from_env()
    if location.scheme == "s3" and settings.endpoint_url:
        return f"{settings.endpoint_url.rstrip('/')}/{location.path}/"
    if location.scheme == "s3":
        bucket, _, key = location.path.partition("/")
        return f"https://{bucket}.s3.amazonaws.com/{key}/"
    return uri


def training_chart(history: list[dict], width: int = 640, height: int = 240) -> str:
    """Loss and validation score per epoch as a PNG data URI: two panels side by side,
    drawn with Pillow (no plotting library in the image)."""
    from PIL import ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    score, score_name = validation_score(history)
    panels = [("training loss", [row.get("loss") for row in history], (200, 60, 40)),
              (score_name, [row.get(score) for row in history], (40, 90, 200))]
    epochs = [row["epoch"] for row in history]
    panel_width = width // 2
    for index, (title, values, colour) in enumerate(panels):
        left, top, right, bottom = index * panel_width + 48, 24, (index + 1) * panel_width - 12, height - 28
        draw.text((left, 6), title, fill="black")
        draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
        points = [(epoch, value) for epoch, value in zip(epochs, values) if value is not None]
        if not points:
            continue
        low, high = min(v for _, v in points), max(v for _, v in points)
        high = high if high > low else low + 1e-9
        first, last = epochs[0], max(epochs[-1], epochs[0] + 1)
        xy = [(left + (right - left) * (epoch - first) / (last - first),
               bottom - (bottom - top) * (value - low) / (high - low)) for epoch, value in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((left - 44, top - 4), f"{high:.4g}", fill="black")
        draw.text((left - 44, bottom - 8), f"{low:.4g}", fill="black")
        draw.text((left, bottom + 6), f"epoch {first}", fill="black")
        draw.text((right - 52, bottom + 6), f"epoch {epochs[-1]}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def validation_score(history: list[dict]) -> tuple[str, str]:
    """The validation score the epochs have, and its label: PSNR against references, or
    without them SURE's estimate of it (N2N's where no image was large enough)."""
    for key, label in (("val_psnr", "val PSNR (dB)"), ("val_sure_psnr", "val SURE PSNR (dB, no references)")):
        if any(row.get(key) is not None for row in history):
            return key, label
    return "val_n2n_psnr", "val N2N PSNR (dB, no references)"


def training_artifact(summary: dict, data: str) -> None:
    """The run's scores (table) and its curves per epoch (markdown with the chart embedded)."""
    history = summary.get("history") or []
    evaluation_artifact([{k: v for k, v in summary.items() if k != "history"}], key="training",
                        description=f"Training on {data}")
    lines = [f"# Training {summary['version']}", "", f"Data: `{data}`; checkpoints: `{summary['checkpoints']}`", ""]
    if history:
        score, score_name = validation_score(history)
        lines += [f"![loss and validation score per epoch]({training_chart(history)})", "",
                  f"| epoch | loss | {score_name} | minutes |", "| --- | --- | --- | --- |"]
        lines += [f"| {row['epoch']} | {row['loss']:.5f} | {row.get(score) or float('nan'):.2f} | "
                  f"{row['elapsed_s'] / 60:.1f} |" for row in history]
    create_markdown_artifact("\n".join(lines), key="training-curves", description=f"Training curves, {summary['version']}")


def evaluation_artifact(rows: list[dict], key: str, description: str) -> None:
    create_table_artifact([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows],
                          key=key, description=description)
