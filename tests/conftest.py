"""Shared fixtures: a real SeaweedFS S3 server for the session, test data from ../shared/data."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

from local import s3server

REPO = Path(__file__).resolve().parents[1]

# Prefect reads its settings lazily from the environment: set them before any test module
# imports it, so the suite never touches ~/.prefect and never phones home.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="resflow-prefect-home-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
# Ray reads its auth mode once per process: the multi-node cluster (token auth, as every
# Ray 2.60 head) must be reachable from here whichever test imported Ray first.
os.environ["RAY_AUTH_MODE"] = "token"
# One S3 request may take at most this long before it is retried: short enough that the
# outage drills (a paused S3 server) outlast it, long for a loopback server.
os.environ.setdefault("RESFLOW_S3_REQUEST_TIMEOUT_S", "10")
SHARED_DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.fail(f"test data {path} is missing: set RESFLOW_SHARED_DATA to the benchmark folder")
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on free loopback ports, with the AWS variables pointing at it."""
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    server = s3server.start(data_dir, buckets=("resflow", "tests"))
    saved = {key: os.environ.get(key) for key in server.env()}
    os.environ.update(server.env())
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3server.stop(data_dir)


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh s3:// prefix per test, so tests never see each other's objects."""
    return f"s3://tests/{request.node.name[:40].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session, started after the S3 variables are set so that its
    workers inherit them. 4 logical CPUs on 2 cores: see pipeline/raycluster.py."""
    import ray

    from pipeline import raycluster

    raycluster.connect(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def train400_small(s3_server, tmp_path_factory):
    """24 Train400 images for training and 4 held out, as Parquet in S3."""
    from pipeline.ingest import ingest

    source = tmp_path_factory.mktemp("train400")
    files = sorted(shared_data("Train400").glob("*.png"))
    for index, path in enumerate(files[:28]):
        (source / ("val" if index >= 24 else "train")).mkdir(exist_ok=True)
        (source / ("val" if index >= 24 else "train") / path.name).write_bytes(path.read_bytes())
    root = f"s3://tests/train400-{uuid.uuid4().hex[:6]}"
    ingest(str(source / "train"), root + "/train", rows_per_file=12, progress=False)
    ingest(str(source / "val"), root + "/val", progress=False)
    return root


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> str:
    """A tiny DnCNN trained in-process for a few seconds on Train400 patches (never on
    Set12/BSD68): enough to beat the noisy input at sigma 25."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from pipeline.modelio import save_model
    from pipeline.models import build_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [np.asarray(Image.open(path), np.float32) / 255 for path in sorted(shared_data("Train400").glob("*.png"))[:40]]
    model = build_model("dncnn", depth=5, width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(250):
        patches = []
        for _ in range(16):
            image = images[rng.integers(len(images))]
            y, x = rng.integers(0, image.shape[0] - 32), rng.integers(0, image.shape[1] - 32)
            patches.append(image[y : y + 32, x : x + 32])
        clean = torch.from_numpy(np.stack(patches))[:, None]
        noisy = clean + torch.randn_like(clean) * 25 / 255
        loss = F.mse_loss(model(noisy), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("trained") / "model"
    save_model(str(path), model.eval(), degradation={"noise_sigma": 25})
    return str(path)


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API server (a subprocess on a free port with a temporary database)
    for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def publish_version(model_folder: str, registry_uri: str, version: str) -> str:
    """Copy a model folder into a registry as `version`."""
    from pipeline import registry
    from pipeline.modelio import load_model, save_model

    model, card = load_model(model_folder)
    save_model(registry.version_uri(registry_uri, version), model, version=version, degradation=card.degradation)
    return registry.version_uri(registry_uri, version)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where torch sees a CUDA device (CI has none)."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_tests:
            item.add_marker(skip)
