"""A multi-node Ray cluster on one machine, for tests and for trying cluster behaviour.

    resflow cluster up --nodes 3 --cpus-per-node 2     # a head and 2 worker nodes, then prints RAY_ADDRESS
    eval "$(resflow cluster env)"                       # RAY_ADDRESS for `resflow train|restore`
    resflow cluster status
    resflow cluster down                                # stops exactly the nodes it started, by PID

Every node is its own `ray start --block` process (own raylet, object store and
resources, including a `node-<i>` resource so that placement can be checked), so
scheduling, object transfer and node loss across nodes are real. The head advertises
`head_cpus` (0 by default, as on KubeRay) so work lands on the worker nodes. Each node
gets its own short temp dir (Unix socket paths must stay under 108 bytes) and its own
agent ports (the dashboard agent's default port would collide). Stopping a node sends
SIGTERM to its `ray start --block`, which stops that node's processes; what is left after
`STOP_GRACE_S` is killed.
`ray stop` is never used: it would kill every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from local.processes import (
    descendants,
    free_ports,
    kill_group,
    pid_alive,
    stop_pid,
    wait_until,
)
from pipeline.raycluster import WORKER_ENV

DEFAULT_DIR = Path(os.environ.get("RESFLOW_HOME", Path.home() / ".resflow")) / "cluster"
STATE_FILE = "cluster.json"
READY_LINE = "Ray runtime started"
# Ray 2.60 heads require a token (~/.ray/auth_token); nodes joining and clients with an
# explicit address must say so or GCS refuses them.
AUTH_ENV = {"RAY_AUTH_MODE": "token"}


@dataclass
class Node:
    name: str  # head, node-1, node-2, ...
    pid: int  # the `ray start --block` process; its process group holds the node
    cpus: float
    temp_dir: str
    log: str
    command: list = field(default_factory=list)  # to start the node again after a drill


@dataclass
class LocalCluster:
    state_dir: str
    gcs_address: str
    dashboard_url: str
    temp_root: str
    nodes: list[Node] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.gcs_address, "RAY_DASHBOARD_ADDRESS": self.dashboard_url, **AUTH_ENV}

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)


def ray_binary() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def node_env() -> dict[str, str]:
    """The nodes inherit this process's environment (AWS_* included: Ray jobs and workers
    read storage with it), with this interpreter's bin folder first on PATH so that a
    job's `python -m pipeline.cli ...` finds resflow."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for key, value in WORKER_ENV.items():
        env.setdefault(key, value)
    env.update(AUTH_ENV)
    return env


def _start_node(command: list[str], name: str, cpus: float, temp_dir: str, log_path: Path) -> Node:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=node_env())
    return Node(name, process.pid, cpus, temp_dir, str(log_path), command)


def _wait_ready(node: Node, timeout: float, log_offset: int = 0) -> None:
    def ready() -> bool:
        with open(node.log, errors="replace") as handle:
            handle.seek(log_offset)
            return READY_LINE in handle.read()

    wait_until(ready, timeout, f"Ray node {node.name} (log {node.log})", alive=lambda: pid_alive(node.pid))


def start(state_dir: str | os.PathLike = DEFAULT_DIR, nodes: int = 3, cpus_per_node: float = 2,
          head_cpus: float = 0, object_store_mb: int = 1024, timeout: float = 120) -> LocalCluster:
    """Start a head plus `nodes - 1` worker nodes (nodes=1: the head alone, with
    `cpus_per_node` CPUs)."""
    if nodes < 1:
        raise ValueError("a cluster needs at least 1 node")
    state_dir = Path(state_dir)
    existing = read_state(state_dir)
    if existing and pid_alive(existing.nodes[0].pid):
        raise RuntimeError(f"a local Ray cluster is already running from {state_dir} (head PID {existing.nodes[0].pid});"
                           f" stop it with `resflow cluster down --dir {state_dir}`")
    state_dir.mkdir(parents=True, exist_ok=True)
    temp_root = tempfile.mkdtemp(prefix="rf-ray-")
    gcs_port, dashboard_port, *agent_ports = free_ports(2 + 3 * nodes)
    ray = ray_binary()
    common = ["--block", "--disable-usage-stats", f"--object-store-memory={object_store_mb * 1024 * 1024}"]

    def node_ports(index: int) -> list[str]:
        listen, grpc, metrics = agent_ports[3 * index: 3 * index + 3]
        return [f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
                f"--metrics-export-port={metrics}"]

    head_temp = os.path.join(temp_root, "h")
    head_cpu_count = cpus_per_node if nodes == 1 else head_cpus
    head = _start_node(
        [ray, "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--num-cpus={head_cpu_count:g}", f"--temp-dir={head_temp}",
         f"--resources={json.dumps({'node-0': 1})}", *node_ports(0), *common],
        "head", head_cpu_count, head_temp, state_dir / "head.log")
    cluster = LocalCluster(str(state_dir), f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", temp_root,
                           [head])
    _write_state(cluster)
    try:
        _wait_ready(head, timeout)
        for index in range(1, nodes):
            temp_dir = os.path.join(temp_root, f"n{index}")
            cluster.nodes.append(_start_node(
                [ray, "start", f"--address={cluster.gcs_address}", f"--num-cpus={cpus_per_node:g}",
                 f"--temp-dir={temp_dir}", f"--resources={json.dumps({f'node-{index}': 1})}", *node_ports(index),
                 *common],
                f"node-{index}", cpus_per_node, temp_dir, state_dir / f"node-{index}.log"))
            _write_state(cluster)
        for node in cluster.nodes[1:]:
            _wait_ready(node, timeout)
    except BaseException:
        stop(state_dir)
        raise
    return cluster


def _write_state(cluster: LocalCluster) -> None:
    Path(cluster.state_dir, STATE_FILE).write_text(json.dumps(asdict(cluster), indent=2))


def read_state(state_dir: str | os.PathLike = DEFAULT_DIR) -> LocalCluster | None:
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data["nodes"] = [Node(**node) for node in data["nodes"]]
    return LocalCluster(**data)


def kill_raylet(cluster: LocalCluster, name: str) -> int:
    """SIGKILL one node's raylet, as a machine loss would; returns its PID."""
    node = read_state(cluster.state_dir).node(name)  # the recorded state: the node may have been restarted
    raylets = [pid for pid, command in descendants(node.pid) if "/raylet" in command.split(" ")[0]]
    if not raylets:
        raise RuntimeError(f"no raylet found under node {name} (PID {node.pid})")
    os.kill(raylets[0], 9)
    return raylets[0]


def restart_node(state_dir: str | os.PathLike, name: str, timeout: float = 120) -> Node:
    """Start a lost worker node again with the same resources and ports (what an
    autoscaler does when it replaces a machine)."""
    cluster = read_state(state_dir)
    old = cluster.node(name)
    if name == "head":
        raise ValueError("the head cannot be restarted into a running cluster")
    stop_pid(old.pid, timeout=45)  # what is left of the node: its `ray start --block` and children
    kill_group(old.pid)
    offset = Path(old.log).stat().st_size if Path(old.log).exists() else 0
    node = _start_node(old.command, name, old.cpus, old.temp_dir, Path(old.log))
    cluster.nodes = [node if n.name == name else n for n in cluster.nodes]
    _write_state(cluster)
    _wait_ready(node, timeout, offset)
    return node


# On SIGTERM a node's raylet exits within about 10 s, but its `ray start --block` and the
# head's GCS then idle some 20 s more (an idle 3-node cluster took 33.7 s to stop): past
# this grace what is left of a node is killed.
STOP_GRACE_S = 15.0


def stop(state_dir: str | os.PathLike = DEFAULT_DIR) -> LocalCluster | None:
    """Every node by the PID we recorded."""
    cluster = read_state(state_dir)
    if cluster is None:
        return None
    # All at once: every node's grace runs at the same time.
    stoppers = [threading.Thread(target=stop_pid, args=(node.pid, STOP_GRACE_S)) for node in cluster.nodes]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
    for node in cluster.nodes:  # agents of a node that lost its raylet outlive its leader
        kill_group(node.pid)
    Path(state_dir, STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(cluster.temp_root, ignore_errors=True)
    return cluster


def status(state_dir: str | os.PathLike = DEFAULT_DIR) -> dict:
    cluster = read_state(state_dir)
    if cluster is None:
        return {"running": False, "state_dir": str(state_dir)}
    return {"running": pid_alive(cluster.nodes[0].pid), "ray_address": cluster.gcs_address,
            "dashboard": cluster.dashboard_url,
            "nodes": [{"name": n.name, "pid": n.pid, "cpus": n.cpus, "alive": pid_alive(n.pid)} for n in cluster.nodes]}


def alive_nodes(address: str, timeout: float = 60) -> int:
    """Nodes the cluster itself reports alive (asked from a subprocess: this process may
    already be the driver of another Ray)."""
    code = ("import ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))") % address
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                            env=node_env())
    if result.returncode != 0:
        raise RuntimeError(f"cannot reach the Ray cluster at {address}: {result.stderr.strip()[-500:]}")
    return int(result.stdout.strip().splitlines()[-1])

