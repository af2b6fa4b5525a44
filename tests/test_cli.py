"""The command line as people run it: a subprocess with the AWS variables of the test S3 server."""

import json
import os
import subprocess
import sys

from pipeline.degrade import Degradation
from pipeline.ingest import degrade_dataset, ingest
from tests.conftest import REPO, shared_data


def resflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, timeout=600)


def test_evaluate_and_restore_print_json(s3_prefix, trained_model):
    ingest(str(shared_data("Set12")), s3_prefix + "/clean", rows_per_file=6, progress=False)
    degrade_dataset(s3_prefix + "/clean", s3_prefix + "/noisy", Degradation(noise_sigma=25), progress=False)

    protocol = resflow("evaluate", "--model", trained_model, "--data", s3_prefix + "/clean", "--noise-sigma", "25", "--json")
    assert protocol.returncode == 0, protocol.stderr
    summary = json.loads(protocol.stdout)
    assert summary["images"] == 12 and abs(summary["input_psnr"] - 20.37) < 0.01  # clipped uint8 input, as published
    assert summary["output_psnr"] > summary["input_psnr"] + 3

    paired = resflow("evaluate", "--model", trained_model, "--data", s3_prefix + "/noisy", "--per-image")
    assert paired.returncode == 0, paired.stderr
    assert "01.png" in paired.stdout and "12 images (paired dataset)" in paired.stdout

    restored = resflow("restore", "--input", s3_prefix + "/noisy", "--output", s3_prefix + "/out", "--model",
                       trained_model, "--workers", "1", "--json")
    assert restored.returncode == 0, restored.stderr
    report = json.loads(restored.stdout)
    assert report["images_ok"] == 12 and report["files_restored"] == 2 and report["megapixels_per_s"] > 0
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in restored.stdout + restored.stderr


def test_job_level_errors_are_one_clear_line(tmp_path, trained_model):
    result = resflow("restore", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"),
                     "--model", trained_model)
    assert result.returncode == 2
    assert "no Parquet files under" in result.stderr and "Traceback" not in result.stderr
    bad_model = resflow("evaluate", "--model", str(tmp_path), "--data", str(tmp_path))
    assert bad_model.returncode == 2 and "neither a model folder" in bad_model.stderr
