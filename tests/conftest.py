"""Shared fixtures: a real SeaweedFS S3 server for the session, test data from ../shared/data."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from pipeline import s3server

REPO = Path(__file__).resolve().parents[1]
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
