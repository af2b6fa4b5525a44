"""The local stack for people: S3, a Prefect server with its UI, and a Ray head with its
dashboard, left running between commands.

    resflow up                 # starts what is not running yet; prints where each UI is
    eval "$(resflow env)"      # AWS_*, PREFECT_API_URL, RAY_ADDRESS for this shell
    make demo                  # uses the stack when it is up: runs show in the Prefect UI
    resflow down               # stops exactly what `up` started, by PID

State lives in `~/.resflow/stack` (RESFLOW_STACK_DIR): the S3 data, the Prefect
database, logs, and `stack.json` with PIDs and addresses. The Ray head inherits the S3
settings, so Ray jobs submitted by the flows read and write the same buckets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from local import ray_nodes, s3server
from local.processes import free_ports, pid_alive, port_free, stop_pid, wait_until

DEFAULT_DIR = Path(os.environ.get("RESFLOW_STACK_DIR", Path.home() / ".resflow" / "stack"))
STATE_FILE = "stack.json"
PREFECT_PORT = 4200


def _prefect_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001 - not up yet, whatever the reason
        return False


def read_state(state_dir: str | os.PathLike = DEFAULT_DIR) -> dict | None:
    path = Path(state_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def running(state_dir: str | os.PathLike = DEFAULT_DIR) -> dict | None:
    """The stack's state when all three parts answer, else None."""
    state = read_state(state_dir)
    if not state:
        return None
    s3 = s3server.status(Path(state_dir) / "s3")
    ray = ray_nodes.status(Path(state_dir) / "ray")
    if s3.get("running") and ray.get("running") and _prefect_healthy(state["prefect_api_url"]):
        return state
    return None


def start_prefect(state_dir: Path, port: int | None = None, timeout: float = 90) -> dict:
    # None: 4200 when free; 0: any free port (tests)
    port = port or (PREFECT_PORT if port is None and port_free(PREFECT_PORT) else free_ports(1)[0])
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(state_dir / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=api,  # without it the UI on another port calls 127.0.0.1:4200
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port))
    env.pop("PREFECT_API_URL", None)
    log = open(state_dir / "prefect.log", "ab")  # noqa: SIM115 - handed to the child process
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    log.close()
    try:
        wait_until(lambda: _prefect_healthy(api), timeout, f"Prefect server (log {state_dir / 'prefect.log'})",
                   alive=lambda: pid_alive(process.pid))
    except BaseException:
        stop_pid(process.pid)
        raise
    return {"prefect_pid": process.pid, "prefect_api_url": api, "prefect_ui": f"http://127.0.0.1:{port}"}


def up(state_dir: str | os.PathLike = DEFAULT_DIR, ray_cpus: int = 4, prefect_port: int | None = None) -> dict:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(state_dir) or {}
    s3 = s3server.read_state(state_dir / "s3")
    if not (s3 and s3server.status(state_dir / "s3").get("running")):
        s3 = s3server.start(state_dir / "s3", buckets=(s3server.DEFAULT_BUCKET,))
    os.environ.update(s3.env())  # the Ray head and the Prefect server inherit the S3 settings
    state.update({"s3_endpoint": s3.endpoint_url})
    if not ray_nodes.status(state_dir / "ray").get("running"):
        ray_nodes.stop(state_dir / "ray")
        ray_nodes.start(state_dir / "ray", nodes=1, cpus_per_node=ray_cpus)
    cluster = ray_nodes.read_state(state_dir / "ray")
    state.update({"ray_address": cluster.gcs_address, "ray_dashboard": cluster.dashboard_url})
    if not (state.get("prefect_pid") and pid_alive(state["prefect_pid"]) and _prefect_healthy(state["prefect_api_url"])):
        state.update(start_prefect(state_dir, prefect_port))
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    return state


def env(state_dir: str | os.PathLike = DEFAULT_DIR) -> dict[str, str]:
    """What a shell (or `make demo`) needs to use the stack. Contains the local S3 server's
    generated credentials: print it only to set a shell's environment."""
    state = read_state(state_dir)
    if not state:
        raise RuntimeError(f"no stack recorded in {state_dir}; start it with `resflow up`")
    s3 = s3server.read_state(Path(state_dir) / "s3")
    cluster = ray_nodes.read_state(Path(state_dir) / "ray")
    return {**s3.env(), "PREFECT_API_URL": state["prefect_api_url"], **cluster.env()}


def down(state_dir: str | os.PathLike = DEFAULT_DIR) -> list[str]:
    """All three at once: SeaweedFS and Ray each take up to 30 s to drain."""
    state_dir = Path(state_dir)
    state = read_state(state_dir) or {}

    def stop_prefect() -> bool:
        if not (state.get("prefect_pid") and pid_alive(state["prefect_pid"])):
            return False
        stop_pid(state["prefect_pid"], timeout=30)
        return True

    stoppers = {
        "prefect": stop_prefect,
        "ray": lambda: ray_nodes.stop(state_dir / "ray"),
        "s3": lambda: s3server.stop(state_dir / "s3"),
    }
    with ThreadPoolExecutor(len(stoppers)) as pool:
        results = {name: pool.submit(stop) for name, stop in stoppers.items()}
    stopped = [name for name, result in results.items() if result.result()]
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def describe(state: dict) -> str:
    return (f"Prefect UI      {state['prefect_ui']}\n"
            f"Ray dashboard   {state['ray_dashboard']}\n"
            f"S3 endpoint     {state['s3_endpoint']}  (bucket: {s3server.DEFAULT_BUCKET})\n"
            f"use it:         eval \"$(resflow env)\"; make demo; resflow deploy; prefect worker start --pool resflow\n"
            f"stop it:        resflow down")
