"""The command line as people run it: a subprocess with the AWS variables of the test S3 server."""

import json
import os
import subprocess
import sys

from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.ingest import ingest
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


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """A user error is one line on stderr, exit status 2, and never a traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_user_errors_are_one_line_with_a_usage_exit_status(s3_server, tmp_path):
    bad_value = one_line_error(resflow("restore", "--input", "a", "--output", "b", "--model", "m", "--tile", "big"))
    assert "--tile: invalid int value: 'big'" in bad_value
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RESFLOW_S3_", "RAY_ADDRESS"))}
    unreachable = subprocess.run([sys.executable, "-m", "pipeline.cli", "restore", "--input", "s3://b/in", "--output",
                                  "s3://b/out", "--model", "s3://b/models"], capture_output=True, text=True, cwd=REPO,
                                 env={**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
                                      "AWS_SECRET_ACCESS_KEY": "s"}, timeout=120)
    assert "cannot reach http://127.0.0.1:9" in one_line_error(unreachable) and "AWS_ENDPOINT_URL" in unreachable.stderr
    no_credentials = subprocess.run([sys.executable, "-m", "pipeline.cli", "restore", "--input", "s3://tests/in",
                                     "--output", "s3://tests/out", "--model", "s3://tests/models"], capture_output=True,
                                    text=True, cwd=REPO, timeout=120,
                                    env={**env, "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
                                         "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path)})
    assert "no credentials" in one_line_error(no_credentials)
    wrong = subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest", str(tmp_path), "s3://tests/x"],
                           capture_output=True, text=True, cwd=REPO, timeout=120,
                           env={**env, "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_ACCESS_KEY_ID": "nobody",
                                "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert "refused the credentials" in one_line_error(wrong)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in no_credentials.stderr + wrong.stderr


def test_unknown_flow_parameters_are_refused_with_the_valid_names():
    for command in (["flow", "nightly"], ["deploy"]):
        result = subprocess.run([sys.executable, "-m", "flows.cli", *command, "--param", "inptu=s3://x"],
                                capture_output=True, text=True, cwd=REPO, timeout=300)
        line = one_line_error(result)
        assert "unknown parameter(s) inptu" in line and "input" in line and "train_every_days" in line


def test_train_then_promote_then_restore_from_the_registry(train400_small, s3_prefix):
    """As a new user would: a trained version is not yet a champion; the error says what to
    do; after `resflow models promote` the registry restores."""
    registry_uri = s3_prefix + "/models"
    trained = resflow("train", "--data", train400_small + "/train", "--val-data", train400_small + "/val",
                      "--registry", registry_uri, "--preset", "tiny", "--epochs", "1", "--cpus-per-worker", "0.5",
                      "--json")
    assert trained.returncode == 0, trained.stderr[-3000:]
    version = json.loads(trained.stdout)["version"]
    listed = json.loads(resflow("models", "list", registry_uri, "--json").stdout)
    assert [row["version"] for row in listed["versions"]] == [version] and listed["champion"] is None
    restore = ["restore", "--input", train400_small + "/val", "--output", s3_prefix + "/out", "--model", registry_uri,
               "--workers", "1", "--json"]
    refused = one_line_error(resflow(*restore))
    assert f"resflow models promote {registry_uri} {version}" in refused
    promoted = resflow("models", "promote", registry_uri, version, "--json")
    assert promoted.returncode == 0 and json.loads(promoted.stdout)["version"] == version
    shown = json.loads(resflow("models", "show", registry_uri, "--json").stdout)
    assert shown["version"] == version and shown["architecture"] == "resnet"
    restored = resflow(*restore)
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert json.loads(restored.stdout)["model_version"] == version


def test_the_cli_and_the_flows_build_a_restore_job_from_its_fields():
    """One builder (jobs.restore_job) by field name: the CLI's restore flags land on the
    fields they name, and every restore flow parameter is a field with the field's default."""
    import inspect

    import pytest

    from flows.flows import nightly_flow, restore_flow
    from pipeline.cli import build_parser, restore_job_from
    from pipeline.jobs import RestoreJob, restore_job, restore_setting_names

    args = build_parser().parse_args(["restore", "--input", "a", "--output", "b", "--model", "m", "--gpu", "--tile",
                                      "256", "--skip-below", "3", "--prune", "--stall-timeout", "9", "--lease-ttl",
                                      "30", "--image-column", "img"])
    assert restore_job_from(args) == restore_job("a", "b", "m", use_gpu=True, tile=256, skip_below=3.0, prune=True,
                                                 stall_timeout_s=9.0, lease_ttl_s=30.0, image="img")
    job = RestoreJob("a", "b", "m")
    field_defaults = {**vars(job), **vars(job.settings), **vars(job.columns)}
    for flow, own in ((restore_flow, {"input", "output", "model", "previews", "quality_sample"}),
                      (nightly_flow, None)):
        parameters = inspect.signature(flow.fn).parameters
        settings = [name for name in parameters if name in restore_setting_names()]
        assert {"tile", "batch_size", "skip_below", "prune", "workers", "use_gpu"} <= set(settings)
        if own is not None:
            assert set(parameters) - own == set(settings)  # nothing else, nothing restated by another name
        for name in settings:
            assert parameters[name].default == field_defaults[name], name
    with pytest.raises(ValueError, match="unknown RestoreJob setting"):
        restore_job("a", "b", "m", tiles=3)


def test_fp32_turns_bf16_off_in_train_restore_and_evaluate():
    """`--fp32` is how a run on a bf16 CPU stands in for one without bf16; a train preset's
    other settings stay the preset's, and --balance-noise-levels reaches the config."""
    from pipeline.cli import build_parser, restore_job_from, settings_from, train_job_from
    from pipeline.config import train_preset

    base = ["train", "--data", "a", "--val-data", "b", "--registry", "m", "--preset", "cpu", "--seed", "3"]
    default, fp32 = (train_job_from(build_parser().parse_args(base + extra)) for extra in ([], ["--fp32"]))
    assert default.config.scaling.bf16 is True and fp32.config.scaling.bf16 is False
    assert fp32.config.seed == 3
    assert fp32.config.model == train_preset("cpu").model and fp32.config.optimiser == train_preset("cpu").optimiser
    assert not default.config.data.balance_noise_levels
    balanced = train_job_from(build_parser().parse_args(base + ["--preset", "cpu-blind", "--balance-noise-levels"]))
    assert balanced.config.data.balance_noise_levels and balanced.config.data.degradation.noise_sigma_range == (0, 55)
    for command in (["restore", "--input", "a", "--output", "b"], ["evaluate", "--data", "a"]):
        default, fp32 = (build_parser().parse_args(command + ["--model", "m"] + extra) for extra in ([], ["--fp32"]))
        assert default.bf16 is True and fp32.bf16 is False
    restore = ["restore", "--input", "a", "--output", "b", "--model", "m", "--fp32"]
    assert restore_job_from(build_parser().parse_args(restore)).settings.bf16 is False
    assert settings_from(build_parser().parse_args(["evaluate", "--data", "a", "--model", "m", "--fp32"])).bf16 is False


def test_the_ray_job_entry_point_reports_a_rejected_job_as_an_event_and_exit_status_2(tmp_path, capsys):
    """What cluster mode decides retries by: the error event's kind and the exit status."""
    from pipeline.jobs import EXIT_REJECTED, RestoreJob, job_to_json, read_event
    from pipeline.steps import main

    job = RestoreJob(input=str(tmp_path / "missing"), output=str(tmp_path / "out"), model=str(tmp_path / "model"))
    assert main([job_to_json(job)]) == EXIT_REJECTED
    events = [event for event in map(read_event, capsys.readouterr().out.splitlines()) if event]
    assert [event["resflow_event"] for event in events] == ["error"]
    assert events[0]["kind"] == "rejected" and "neither a model folder" in events[0]["message"]
