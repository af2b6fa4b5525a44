"""The Prefect flows against a real Prefect API server, SeaweedFS and local Ray."""

import asyncio
import threading

import pytest

from flows import tasks
from flows.flows import challenge_flow, nightly_flow
from pipeline import registry, storage
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.ingest import ingest
from pipeline.jobs import RestoreJob
from pipeline.modelio import save_model
from pipeline.models import build_model
from tests.conftest import publish_version, shared_data


@pytest.fixture(scope="module")
def set12_paired(s3_server, tmp_path_factory):
    """Set12 (clean -> noisy at sigma 25) in three files of 4: the first two are the
    nightly input, the third arrives later."""
    root = f"s3://tests/flows-{tmp_path_factory.mktemp('x').name}"
    ingest(str(shared_data("Set12")), root + "/clean", rows_per_file=4, progress=False)
    degrade_dataset(root + "/clean", root + "/noisy", Degradation(noise_sigma=25), progress=False)
    return root + "/noisy"


def copy_files(source_files, destination):
    for info in source_files:
        storage.write_bytes(storage.join(destination, info.uri.rsplit("/", 1)[1]), storage.read_bytes(info.uri))


def artifacts_of(flow_run_ids):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=list(flow_run_ids))))

    return asyncio.run(read())


def flow_run_tree(parent_id):
    """A flow run and its subflow runs."""
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            return [run.id for run in runs if run.id == parent_id or run.parent_task_run_id is not None]

    return asyncio.run(read())


def test_nightly_restores_new_files_only_and_leaves_artifacts(prefect_api, ray_local, set12_paired, trained_model,
                                                              s3_prefix):
    models = s3_prefix + "/models"
    registry.set_champion(models, "v1", reason="test") if publish_version(trained_model, models, "v1") else None
    incoming, output = s3_prefix + "/incoming", s3_prefix + "/restored"
    files = storage.list_files(set12_paired)
    copy_files(files[:2], incoming)
    params = dict(input=incoming, output=output, registry=models, train_every_days=0, workers=2, batch_size=4,
                  previews=2)

    state = nightly_flow(**params, return_state=True)
    first = state.result()
    assert [uri.rsplit("/", 1)[1] for uri in first["new_files"]] == [f.uri.rsplit("/", 1)[1] for f in files[:2]]
    assert (first["restore"]["images_ok"], first["restore"]["images_failed"]) == (8, 0)
    quality = first["restore"]["metrics"]
    assert quality["psnr_after"] > quality["psnr_before"] + 3  # the sample scored against the clean target
    assert first["champion_after"] == "v1" and "challenge" not in first
    assert storage.exists(first["record"])

    found = {artifact.key: artifact for artifact in artifacts_of(flow_run_tree(state.state_details.flow_run_id))}
    assert {"restore-metrics", "restore-summary", "restore-output", "restore-progress", "nightly-summary"} <= set(found)
    assert found["restore-summary"].data.count("data:image/jpeg;base64,") == 4  # 2 previews, before and after
    summary = found["restore-summary"].data  # the run's estimated noise: Set12 at sigma 25
    assert "## Estimated noise" in summary and "over 8 images" in summary and "| 0-1 | 0 |" in summary
    assert sum(first["restore"]["noise_sigma_counts"][23:28]) == 8
    assert float(found["restore-progress"].data) == 100.0

    copy_files(files[2:], incoming)  # a new file arrives
    second = nightly_flow(**params)
    assert [uri.rsplit("/", 1)[1] for uri in second["new_files"]] == [files[2].uri.rsplit("/", 1)[1]]
    assert (second["restore"]["files_restored"], second["restore"]["files_skipped"]) == (1, 2)
    assert nightly_flow(**params)["new_files"] == []  # nothing new: nothing restored


def test_nightly_with_skip_below_plans_what_it_restores(prefect_api, ray_local, set12_paired, trained_model,
                                                       s3_prefix):
    """The nightly flow plans and restores one job: with a threshold set, a night after the
    first finds nothing new (planning without the threshold saw every file as new)."""
    models = s3_prefix + "/models"
    registry.set_champion(models, "v1", reason="test") if publish_version(trained_model, models, "v1") else None
    incoming = s3_prefix + "/incoming"
    copy_files(storage.list_files(set12_paired)[:1], incoming)
    params = dict(input=incoming, output=s3_prefix + "/restored", registry=models, train_every_days=0,
                  workers=1, batch_size=4, previews=0, skip_below=5.0)
    first = nightly_flow(**params)
    assert len(first["new_files"]) == 1 and first["restore"]["images_ok"] == 4
    second = nightly_flow(**params)
    assert second["new_files"] == [] and "restore" not in second


def test_a_worse_challenger_is_not_promoted_a_better_one_is(prefect_api, set12_paired, trained_model, s3_prefix):
    models = s3_prefix + "/models"
    publish_version(trained_model, models, "good")
    # A residual network with its zero-initialised tail returns its input: no denoising at all.
    identity = build_model("resnet", blocks=1, width=8)
    save_model(registry.version_uri(models, "identity"), identity, version="identity")
    registry.set_champion(models, "good", reason="test")
    before = registry.champion(models)

    decision = challenge_flow(registry.version_uri(models, "identity"), models, set12_paired, noise_sigma=None)
    assert decision["promoted"] is False
    assert registry.champion(models) == before  # the pointer is untouched

    registry.set_champion(models, "identity", reason="test")
    decision = challenge_flow(registry.version_uri(models, "good"), models, set12_paired, noise_sigma=None)
    assert decision["promoted"] is True and registry.champion(models)["version"] == "good"


def test_storage_errors_are_retried_schema_errors_are_not(prefect_api, monkeypatch, s3_prefix, set12_paired):
    from prefect import flow

    calls = []
    real = registry.champion

    def flaky(uri):
        calls.append(uri)
        if len(calls) == 1:
            raise ConnectionError("S3 endpoint went away")
        return real(uri)

    monkeypatch.setattr(registry, "champion", flaky)

    @flow
    def read_it(uri: str):
        return tasks.read_champion(uri)

    assert read_it(s3_prefix + "/models") is None and len(calls) == 2  # failed once, retried, succeeded

    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(s3_prefix + "/bad/part.parquet")
    pq.write_table(pa.table({"image_id": ["a"], "pixels": [b"x"]}), path, filesystem=fs)  # no `image` column
    attempts = []
    real_plan = __import__("pipeline.restore", fromlist=["plan"]).plan

    def counting_plan(job):
        attempts.append(job)
        return real_plan(job)

    monkeypatch.setattr("pipeline.restore.plan", counting_plan)

    @flow
    def plan_it(uri: str):
        return tasks.find_new_inputs(RestoreJob(input=uri, output=s3_prefix + "/out", model=s3_prefix + "/models"))

    state = plan_it(s3_prefix + "/bad", return_state=True)
    assert state.is_failed() and len(attempts) == 1  # deterministic: no retry


def test_a_second_run_on_the_same_input_waits_then_gives_up(prefect_api, s3_prefix, trained_model):
    from prefect.concurrency.sync import concurrency

    models = s3_prefix + "/models"
    publish_version(trained_model, models, "v1")
    registry.set_champion(models, "v1", reason="test")
    incoming = s3_prefix + "/incoming"
    name = tasks.input_lock_name(incoming)
    tasks._ensure_limit(name)
    with concurrency(name, occupy=1, strict=True):  # another nightly run holds the input
        state = nightly_flow(input=incoming, output=s3_prefix + "/out", registry=models, train_every_days=0,
                             lock_timeout_s=3, return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="another run is working on"):
        state.result()


def test_deploy_registers_a_nightly_cron_schedule_with_editable_parameters(prefect_api):
    from prefect.client.orchestration import get_client

    from flows import deploy

    ids = deploy.deploy(work_pool="resflow-test", cron="30 1 * * *", timezone="Europe/Berlin",
                        parameters={"input": "s3://night/incoming", "train_every_days": 14})
    assert set(ids) == {"resflow-nightly", "resflow-restore", "resflow-train", "resflow-evaluate", "resflow-challenge"}
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("resflow-nightly/resflow-nightly")
        restore = client.read_deployment_by_name("resflow-restore/resflow-restore")
        pool = client.read_work_pool("resflow-test")
    assert pool.type == "process" and nightly.work_pool_name == "resflow-test"
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("30 1 * * *", "Europe/Berlin", True)
    assert nightly.parameters == {"input": "s3://night/incoming", "train_every_days": 14}
    assert {"input", "output", "registry", "train_challenger", "min_gain_db"} <= set(
        nightly.parameter_openapi_schema["properties"])  # what the UI's run form offers
    assert restore.schedules == [] and restore.parameters == {"input": "s3://night/incoming"}


def test_a_second_installation_deploys_beside_the_first(prefect_api):
    """infra/k8s dev and prod share one Prefect server: dev's `--name-suffix dev` registers
    deployments and alerts of its own, on its own pool, and leaves prod's as they were."""
    from prefect.client.orchestration import get_client

    from flows import deploy

    prod = deploy.deploy(work_pool="resflow-prod-test", parameters={"input": "s3://prod/in"})
    dev = deploy.deploy(work_pool="resflow-dev-test", parameters={"input": "s3://dev/in"}, name_suffix="dev")
    assert set(dev) == {name + "-dev" for name in prod} and set(dev).isdisjoint(prod)
    deploy.ensure_alerts("http://127.0.0.1:9/prod")
    deploy.ensure_alerts("http://127.0.0.1:9/dev", name_suffix="dev")
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("resflow-nightly/resflow-nightly")
        nightly_dev = client.read_deployment_by_name("resflow-nightly/resflow-nightly-dev")
        automations = {a.name: a for a in client.read_automations()}
    assert (nightly.work_pool_name, nightly.parameters["input"]) == ("resflow-prod-test", "s3://prod/in")
    assert (nightly_dev.work_pool_name, nightly_dev.parameters["input"]) == ("resflow-dev-test", "s3://dev/in")
    for name in deploy.alert_names()[1] + deploy.alert_names("dev")[1]:
        assert name in automations, f"{name}: one installation's alerts replaced the other's"
    failed_dev = automations[deploy.alert_names("dev")[1][0]].trigger.match_related
    failed_dev = failed_dev[0] if isinstance(failed_dev, list) else failed_dev
    assert failed_dev.model_dump() == {"prefect.resource.role": "deployment", "prefect.resource.name": "resflow-nightly-dev"}


def test_a_failed_nightly_run_reaches_the_webhook_with_its_name_and_state(prefect_api, s3_prefix):
    """`resflow deploy --notify-url` sets up automations; a nightly run made to fail (no
    champion, and no training data to make one) notifies a local HTTP receiver."""
    import http.server
    import json
    import time

    from flows import deploy

    received = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server convention
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        deploy.ensure_alerts(f"http://127.0.0.1:{server.server_address[1]}/hook", overdue_minutes=60)
        state = nightly_flow(input=s3_prefix + "/in", output=s3_prefix + "/out", registry=s3_prefix + "/models",
                             train_data=s3_prefix + "/missing", val_data=s3_prefix + "/missing", return_state=True)
        assert state.is_failed()
        deadline = time.monotonic() + 120
        while not received and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        server.shutdown()
    assert received, "no notification reached the webhook"
    text = json.dumps(received)
    assert state.state_details.flow_run_id and "Failed" in text
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run_name = client.read_flow_run(state.state_details.flow_run_id).name
    assert run_name in text


def test_the_training_chart_draws_loss_and_validation_per_epoch():
    import base64
    import io

    import numpy as np
    from PIL import Image

    from flows.artifacts import training_chart

    history = [{"epoch": epoch, "loss": 0.01 / epoch, "val_score": 28 + epoch / 4, "val_psnr": 28 + epoch / 4}
               for epoch in range(1, 9)]
    uri = training_chart(history)
    assert uri.startswith("data:image/png;base64,")
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")).astype(int)
    half = pixels.shape[1] // 2
    loss_ink = (abs(pixels[:, :half] - (200, 60, 40)).sum(axis=2) < 30).sum()
    score_ink = (abs(pixels[:, half:] - (40, 90, 200)).sum(axis=2) < 30).sum()
    assert loss_ink > 100 and score_ink > 100  # each panel has its curve
    nothing_yet = training_chart([{"epoch": 1, "loss": None, "val_score": None}])
    empty = np.asarray(Image.open(io.BytesIO(base64.b64decode(nothing_yet.split(",", 1)[1]))).convert("RGB")).astype(int)
    assert (abs(empty - (40, 90, 200)).sum(axis=2) < 30).sum() == 0


def test_restoring_real_noisy_colour_photos_shows_previews_and_each_images_noise(prefect_api, ray_local, s3_prefix,
                                                                                  tmp_path):
    """RNI15 (real noisy photographs, no clean reference) through a colour model: the
    summary artifact shows before/after previews and every image's noise estimate."""
    import re

    import torch

    from flows.flows import restore_flow

    ingest(str(shared_data("RNI15")), s3_prefix + "/rni15", rows_per_file=8, progress=False)
    torch.manual_seed(0)
    save_model(str(tmp_path / "colour"), build_model("resnet", channels=3, blocks=1, width=8, unshuffle=2))
    state = restore_flow(input=s3_prefix + "/rni15", output=s3_prefix + "/restored", model=str(tmp_path / "colour"),
                         workers=2, batch_size=2, previews=3, return_state=True)
    report = state.result()
    assert (report["images_ok"], report["images_failed"], report["images_per_channel"]) == (15, 0, 0)
    found = {artifact.key: artifact for artifact in artifacts_of(flow_run_tree(state.state_details.flow_run_id))}
    summary = found["restore-summary"].data
    assert summary.count("data:image/jpeg;base64,") == 6  # 3 previews, before and after
    assert "no clean reference in this dataset" in summary and "channel at a time" not in summary
    section = summary.split("## Estimated noise per image (the first 15 restored)")[1].split("##")[0]
    estimates = dict(re.findall(r"\| `([^`]+)` \| ([0-9.]+) \|", section))
    assert len(estimates) == 15 and "Bears.png" in estimates
    # Each photograph's own reading (Pattern2 ~35, Dog ~17, Audrey_Hepburn ~0: grain that is not white noise)
    assert float(estimates["Pattern2.png"]) > 25 and float(estimates["Dog.png"]) > 10
    previews = summary.split("## Before / after")[1]
    assert re.search(r"\| `[^`]+` \| [0-9.]+ \| !\[before", previews)  # each preview row carries its estimate


def test_the_restore_artifact_counts_data_failures_apart_from_those_that_can_pass(monkeypatch):
    """The metrics table and the summary say how many failed rows failed for a reason in
    their data and how many for one that can pass (retried by the next run)."""
    from flows import artifacts
    from pipeline.restore.report import RestoreReport, format_report

    drawn = {}
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda rows, **kw: drawn.setdefault("table", rows))
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda text, **kw: drawn.setdefault("markdown", text))
    monkeypatch.setattr(artifacts, "create_link_artifact", lambda *a, **kw: None)
    report = RestoreReport("s3://b/out", "v1", images_ok=5, images_failed=3, images_failed_transient=2,
                           images_retried=4, files_retried=1).to_dict()
    row = artifacts.restore_artifacts(report, "s3://b/in", "s3://b/models", previews=0, sample=0)
    assert (row["images_failed"], row["images_failed_data"], row["images_failed_transient"], row["images_retried"]) \
        == (3, 1, 2, 4) and drawn["table"] == [row]
    assert "3 failed (1 for a reason in the data, 2 for one that can pass" in drawn["markdown"]
    assert "retried 4 row(s) of 1 file(s)" in drawn["markdown"]
    text = format_report(report)
    assert "3 failed (2 for a reason that can pass)" in text and "the next run retries them" in text
