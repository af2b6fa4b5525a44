"""`resflow up` / `resflow down`: the local stack people leave running between commands."""

import json
import subprocess
import sys
import urllib.request

from local import ray_nodes
from local.processes import pid_alive
from tests.conftest import REPO


def resflow(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, **kwargs)


def test_the_resflow_command_has_pipeline_and_orchestration_commands():
    help_text = resflow("--help").stdout
    for command in ("ingest", "train", "restore", "evaluate", "cluster", "up", "down", "deploy", "serve", "flow"):
        assert command in help_text


def test_up_starts_s3_prefect_and_ray_and_down_stops_them(tmp_path):
    up = resflow("up", "--dir", str(tmp_path), "--ray-cpus", "2", "--prefect-port", "0")
    assert up.returncode == 0, up.stderr
    state = json.loads((tmp_path / "stack.json").read_text())
    assert "Prefect UI" in up.stdout and state["prefect_ui"] in up.stdout
    assert urllib.request.urlopen(state["prefect_api_url"] + "/health", timeout=5).status == 200
    assert ray_nodes.alive_nodes(state["ray_address"]) == 1
    exports = resflow("env", "--dir", str(tmp_path)).stdout
    assert "PREFECT_API_URL=" in exports and "AWS_ENDPOINT_URL=" in exports and "RAY_ADDRESS=" in exports
    assert resflow("up", "--dir", str(tmp_path)).returncode == 0  # idempotent: nothing new started
    assert json.loads((tmp_path / "stack.json").read_text())["prefect_pid"] == state["prefect_pid"]

    pids = [state["prefect_pid"], json.loads((tmp_path / "s3" / "server.json").read_text())["pid"],
            *[node.pid for node in ray_nodes.read_state(tmp_path / "ray").nodes]]
    down = resflow("down", "--dir", str(tmp_path))
    assert down.returncode == 0 and "prefect" in down.stdout and "ray" in down.stdout and "s3" in down.stdout
    assert not any(pid_alive(pid) for pid in pids)
    assert resflow("status", "--dir", str(tmp_path)).returncode == 1
