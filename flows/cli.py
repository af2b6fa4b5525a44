"""The `resflow` command: the pipeline's commands (pipeline/cli.py), the local services'
(local/cli.py) and the Prefect ones defined here:

    resflow deploy [--cron C] [--timezone TZ] [--param k=v ...] [--work-pool P] [--gpu]
    resflow serve  [--cron C] [--timezone TZ] [--param k=v ...] [--gpu]
    resflow flow nightly|restore|train|evaluate|challenge [--param k=v ...]   one run now

Prefect is imported when one of these runs, never to build the parser.
"""

from __future__ import annotations

import json
import sys

from flows import FLOW_NAMES
from local import cli as local_cli
from pipeline import cli as pipeline_cli
from pipeline.cli import add_json_flag, command



def run_deploy(args) -> int:
    from flows import deploy

    params = deploy.parse_params(args.param)
    if args.command == "serve":
        deploy.serve(args.cron, args.timezone, params, gpu=args.gpu)
        return 0
    ids = deploy.deploy(args.work_pool, args.cron, args.timezone, params, source=args.source or deploy.REPO,
                        paused=args.paused, gpu=args.gpu, name_suffix=args.name_suffix)
    alerts = (deploy.ensure_alerts(args.notify_url, args.overdue_minutes, name_suffix=args.name_suffix)
              if args.notify_url else [])
    summary = {"deployments": ids, "cron": args.cron, "timezone": args.timezone, "paused": args.paused,
               "work_pool": args.work_pool, "alerts": alerts}
    text = [f"deployment {name}: {deployment_id}" for name, deployment_id in ids.items()]
    if alerts:
        text.append(f"alerts: a failed, crashed or {args.overdue_minutes:g}-minute nightly run notifies the webhook")
    text.append(f"nightly schedule: {args.cron} ({args.timezone}){' paused' if args.paused else ''}. "
                f"Start a worker: prefect worker start --pool {args.work_pool}")
    pipeline_cli.print_result(summary, args, "\n".join(text))
    return 0


def run_flow(args) -> int:
    from flows import deploy
    from flows.flows import FLOWS

    flow = FLOWS[args.flow]
    result = flow(**deploy.parse_params(args.param, {args.flow: flow}))
    print(json.dumps(result, default=str) if args.json else json.dumps(result, indent=2, default=str))
    return 0


def add_commands(commands) -> None:
    for name, summary, example in (
            ("deploy", "register the flows as deployments on a work pool (nightly cron schedule)",
             "  resflow deploy --cron '0 2 * * *' --timezone Europe/Berlin --param input=s3://b/in --param output=s3://b/out\n"
             "  resflow deploy --work-pool resflow-k8s --source /app --gpu   # the Kubernetes work pool (infra/)"),
            ("serve", "serve the deployments from this process (one machine, no work pool)",
             "  resflow serve --cron '0 2 * * *'")):
        p = command(commands, name, summary, example, run_deploy)
        p.add_argument("--cron", default="0 2 * * *", help="the nightly schedule")
        p.add_argument("--timezone", default="UTC", help="IANA time zone of the schedule, e.g. Europe/Berlin")
        p.add_argument("--param", action="append", metavar="KEY=VALUE",
                       help="a flow parameter's default (repeatable); unknown names are refused")
        p.add_argument("--gpu", action="store_true",
                       help="GPU defaults: restore on GPU replicas, train the dncnn-paper preset on GPU workers")
        if name == "deploy":
            p.add_argument("--work-pool", default="resflow", help="created as a process pool when missing")
            p.add_argument("--source", help="folder holding flows/ where the worker runs (default: this checkout)")
            p.add_argument("--paused", action="store_true", help="register the schedule paused")
            p.add_argument("--name-suffix", default="", metavar="S",
                           help="deployments resflow-<flow>-S and alerts of their own: another installation "
                                "on the same Prefect server (infra/k8s dev: --name-suffix dev)")
            p.add_argument("--notify-url", metavar="URL",
                           help="a webhook that hears when a nightly run fails, crashes or runs too long")
            p.add_argument("--overdue-minutes", type=float, default=360,
                           help="with --notify-url: a nightly run still running this long is reported")
            add_json_flag(p)

    p = command(commands, "flow", "run one flow now (PREFECT_API_URL's server, or an ephemeral API)",
                "  resflow flow nightly --param input=s3://resflow/incoming --param output=s3://resflow/restored\n"
                "  resflow flow evaluate --param model=s3://resflow/models --param data=s3://resflow/set12", run_flow)
    p.add_argument("flow", choices=FLOW_NAMES, help="which flow")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a flow parameter (repeatable); unknown names are refused")
    add_json_flag(p)


def main(argv: list[str] | None = None) -> int:
    return pipeline_cli.main(argv, extensions=(local_cli.add_commands, add_commands))


if __name__ == "__main__":
    sys.exit(main())
