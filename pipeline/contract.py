"""The data contract's names and limits (docs/architecture.md, "Data contract"): which columns hold
the id, the image and the clean target, and what an image may declare before it is
refused. Kept apart so that anything may import them without loading pyarrow or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# What restore adds to every row: status (ok / failed / skipped), error (why a row failed, else
# null), model_version, and noise_sigma (the input's estimated noise, null when it did not decode).
OUTPUT_COLUMNS = ("status", "error", "model_version", "noise_sigma")

# The error of a row that failed for a reason that can pass (a storage or network error, out
# of memory, a referenced `path` file missing or unreadable) starts with this: a later run
# retries such rows, up to RestoreJob.retries times. Any other failed row failed for a
# reason in its data (corrupt, too large, wrong format) and stays failed.
TRANSIENT = "transient: "


def transient(reason: str) -> str:
    return TRANSIENT + reason


def is_transient(error: str | None) -> bool:
    return bool(error) and error.startswith(TRANSIENT)


@dataclass(frozen=True)
class ImageColumns:
    """Names of the data contract's columns (configurable per dataset)."""

    id: str = "image_id"
    image: str = "image"
    target: str = "target"


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 64_000_000  # 8k x 8k; a larger declared size is a decompression bomb until proven otherwise
    min_side: int = 8  # smaller images carry too little content to restore or to score (SSIM window is 11)
    max_bytes: int = 256 * 1024 * 1024  # an encoded value beyond this is not a plausible image

    def __post_init__(self):
        if self.max_pixels < 1 or self.min_side < 1 or self.max_bytes < 1:
            raise ValueError("DecodeLimits: max_pixels, min_side and max_bytes must be positive")
