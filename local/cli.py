"""`resflow` commands for the embedded defaults: the services a laptop or CI runs.

    resflow storage up|down|status|env      a local S3 server (SeaweedFS) on loopback
    resflow cluster up|down|status|env      a multi-node Ray cluster on this machine
    resflow up | down | status | env        the whole local stack: S3, Prefect server + UI, Ray head

Each starts processes on loopback, records their PIDs in a state folder, and `down`
stops exactly those, by PID.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline.cli import add_json_flag, command

HOME = Path(os.environ.get("RESFLOW_HOME", Path.home() / ".resflow"))  # state of every local service


def run_storage(args) -> int:
    from local import s3server

    data_dir = args.dir or s3server.DEFAULT_DIR
    if args.action == "up":
        server = s3server.start(data_dir, port=args.port, buckets=tuple(args.bucket or [s3server.DEFAULT_BUCKET]))
        print(f"SeaweedFS S3 is up: {server.endpoint_url} (pid {server.pid}, data in {server.data_dir})\n"
              f"use it from this shell with:\n  eval \"$(resflow storage env"
              + (f" --dir {args.dir}" if args.dir else "") + ")\"", file=sys.stderr)
        return 0
    if args.action == "env":
        server = s3server.read_state(data_dir)
        if server is None:
            raise FileNotFoundError(f"no local S3 server recorded in {data_dir}; run `resflow storage up` first")
        for key, value in server.env().items():  # for eval: credentials go to stdout only when asked
            print(f"export {key}={value}")
        return 0
    if args.action == "down":
        server = s3server.stop(data_dir)
        print("stopped " + repr(server) if server else f"no local S3 server recorded in {data_dir}")
        return 0
    state = s3server.status(data_dir)
    print(json.dumps(state) if args.json else "\n".join(f"{key}: {value}" for key, value in state.items()))
    return 0 if state["running"] else 1


def run_cluster(args) -> int:
    from local import ray_nodes

    state_dir = args.dir or ray_nodes.DEFAULT_DIR
    if args.action == "up":
        cluster = ray_nodes.start(state_dir, nodes=args.nodes, cpus_per_node=args.cpus_per_node,
                                  head_cpus=args.head_cpus, object_store_mb=args.object_store_mb)
        print(f"local Ray cluster up: {len(cluster.nodes)} node(s), dashboard {cluster.dashboard_url}\n"
              f"use it from this shell with:\n  eval \"$(resflow cluster env)\"", file=sys.stderr)
        return 0
    if args.action == "env":
        cluster = ray_nodes.read_state(state_dir)
        if cluster is None:
            raise FileNotFoundError(f"no local Ray cluster recorded in {state_dir}; start one with `resflow cluster up`")
        for key, value in cluster.env().items():
            print(f"export {key}={value}")
        return 0
    if args.action == "down":
        cluster = ray_nodes.stop(state_dir)
        print("stopped" if cluster else f"no local Ray cluster recorded in {state_dir}")
        return 0
    state = ray_nodes.status(state_dir)
    print(json.dumps(state) if args.json else json.dumps(state, indent=2))
    return 0 if state["running"] else 1


def run_stack(args) -> int:
    from local import stack

    state_dir = args.dir or stack.DEFAULT_DIR
    if args.command == "up":
        print(stack.describe(stack.up(state_dir, ray_cpus=args.ray_cpus, prefect_port=args.prefect_port)))
    elif args.command == "down":
        stopped = stack.down(state_dir)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    elif args.command == "env":
        for key, value in stack.env(state_dir).items():
            print(f"export {key}={value}")
    else:
        state = stack.running(state_dir)
        if args.json:
            print(json.dumps({"running": bool(state), **(state or {})}))
        else:
            print(stack.describe(state) if state else f"the stack in {state_dir} is not (fully) running")
        return 0 if state else 1
    return 0


def add_commands(commands) -> None:
    p = command(commands, "storage", "a local S3 server (SeaweedFS) on loopback, for laptops and CI",
                "  resflow storage up && eval \"$(resflow storage env)\"\n  resflow storage down", run_storage)
    p.add_argument("action", choices=["up", "down", "status", "env"], help="start, stop, report, or print exports")
    p.add_argument("--dir", help=f"data and state folder (default: {HOME / 's3'})")
    p.add_argument("--port", type=int, help="S3 port (default: a free one); port + 10000 must be free too")
    p.add_argument("--bucket", action="append", help="bucket to create (repeatable; default: resflow)")
    add_json_flag(p)

    p = command(commands, "cluster", "a multi-node Ray cluster on this machine (one process group per node)",
                "  resflow cluster up --nodes 3 && eval \"$(resflow cluster env)\"\n  resflow cluster down", run_cluster)
    p.add_argument("action", choices=["up", "down", "status", "env"], help="start, stop, report, or print exports")
    p.add_argument("--dir", help=f"state folder (default: {HOME / 'cluster'})")
    p.add_argument("--nodes", type=int, default=3, help="the head plus nodes-1 worker nodes")
    p.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs each worker node offers")
    p.add_argument("--head-cpus", type=int, default=0, help="CPUs the head offers (0: work runs on the workers)")
    p.add_argument("--object-store-mb", type=int, default=1024, help="object store per node")
    add_json_flag(p)

    for name, summary, example in (
            ("up", "start the local stack: S3, Prefect server and UI, Ray head and dashboard",
             "  resflow up && eval \"$(resflow env)\" && make demo"),
            ("down", "stop exactly what `resflow up` started", "  resflow down"),
            ("status", "is the local stack running, and where", "  resflow status --json"),
            ("env", "print export lines that point a shell at the local stack", "  eval \"$(resflow env)\"")):
        p = command(commands, name, summary, example, run_stack)
        p.add_argument("--dir", help=f"state folder (default: {HOME / 'stack'})")
        if name == "up":
            p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the Ray head")
            p.add_argument("--prefect-port", type=int, help="Prefect's port (default: 4200 when free, else a free one)")
        if name == "status":
            add_json_flag(p)
