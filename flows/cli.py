"""The `resflow` command: the pipeline's commands (pipeline/cli.py) plus orchestration.

    resflow up | down | status | env          the local stack: S3, Prefect server + UI, Ray head + dashboard
    resflow deploy [--cron C] [--timezone TZ] [--param k=v ...] [--work-pool P]
    resflow serve  [--cron C] [--timezone TZ] [--param k=v ...]
    resflow flow nightly|restore|train|evaluate|challenge [--param k=v ...]   one run now
"""

from __future__ import annotations

import json
import sys

from pipeline import cli as pipeline_cli


def cmd_stack(args) -> int:
    from flows import stack

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
        print(stack.describe(state) if state else f"the stack in {state_dir} is not (fully) running")
        return 0 if state else 1
    return 0


def cmd_deploy(args) -> int:
    from flows import deploy

    params = deploy.parse_params(args.param)
    if args.command == "serve":
        deploy.serve(args.cron, args.timezone, params)
        return 0
    ids = deploy.deploy(args.work_pool, args.cron, args.timezone, params, source=args.source or deploy.REPO,
                        paused=args.paused)
    for name, deployment_id in ids.items():
        print(f"deployment {name}: {deployment_id}")
    print(f"nightly schedule: {args.cron} ({args.timezone}){' paused' if args.paused else ''}. "
          f"Start a worker: prefect worker start --pool {args.work_pool}")
    return 0


def cmd_flow(args) -> int:
    from flows import deploy
    from flows.flows import FLOWS

    result = FLOWS[args.flow](**deploy.parse_params(args.param))
    print(json.dumps(result, indent=2, default=str))
    return 0


def add_commands(commands) -> None:
    from flows.flows import FLOWS

    for name, text in (("up", "start the local stack (S3, Prefect server and UI, Ray head and dashboard)"),
                       ("down", "stop the local stack"), ("status", "is the local stack running?"),
                       ("env", "print export lines for the local stack")):
        p = commands.add_parser(name, help=text)
        p.add_argument("--dir", help="state folder (default ~/.resflow/stack)")
        if name == "up":
            p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the Ray head")
            p.add_argument("--prefect-port", type=int, help="default 4200, else a free port")
        p.set_defaults(func=cmd_stack)

    for name, text in (("deploy", "register the deployments (nightly cron schedule) on a work pool"),
                       ("serve", "serve the deployments from this process (single machine)")):
        p = commands.add_parser(name, help=text)
        p.add_argument("--cron", default="0 2 * * *", help="nightly schedule (default 02:00)")
        p.add_argument("--timezone", default="UTC", help="IANA time zone of the schedule, e.g. Europe/Berlin")
        p.add_argument("--param", action="append", help="a default flow parameter, key=value (repeatable)")
        if name == "deploy":
            p.add_argument("--work-pool", default="resflow")
            p.add_argument("--source", help="folder holding flows/ where the worker runs (default: this checkout)")
            p.add_argument("--paused", action="store_true", help="register the schedule paused")
        p.set_defaults(func=cmd_deploy)

    p = commands.add_parser("flow", help="run one flow now (PREFECT_API_URL or an ephemeral API)")
    p.add_argument("flow", choices=sorted(FLOWS))
    p.add_argument("--param", action="append", help="a flow parameter, key=value (repeatable)")
    p.set_defaults(func=cmd_flow)


def main(argv: list[str] | None = None) -> int:
    return pipeline_cli.main(argv, extend=add_commands)


if __name__ == "__main__":
    sys.exit(main())
