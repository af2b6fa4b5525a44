"""Deployments: the nightly schedule and on-demand train/restore/evaluate/challenge runs.

    # a Prefect server and a process work pool (the UI at http://127.0.0.1:4200)
    resflow up                                  # or: prefect server start
    resflow deploy --cron "0 2 * * *" --timezone Europe/Berlin --param input=s3://bucket/incoming
    prefect worker start --pool resflow         # runs what the schedule and the UI start
    # one machine, no work pool: this process serves the deployments until stopped
    resflow serve --cron "0 2 * * *"

`deploy` registers deployments on a work pool (created as a `process` pool when
missing; on Kubernetes use a `kubernetes` pool, see infra/). Their code comes from
`--source`, the folder holding `flows/` (this checkout by default; `/app` in the
container image). Parameters given with `--param` become the deployment's defaults, and
every one stays editable in the UI's "Run" form and on the deployment.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect.schedules import Cron

from flows.flows import FLOWS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POOL = "resflow"
DEFAULT_CRON = "0 2 * * *"  # 02:00 every night
SCHEDULED = "nightly"  # the other flows are deployed without a schedule, to run from the UI


def deployment_name(flow_key: str) -> str:
    return f"resflow-{flow_key}"


def parse_params(pairs: list[str]) -> dict:
    """`key=value` pairs; values are JSON when they parse (numbers, true, null), else strings."""
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--param expects key=value, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _schedules(flow_key: str, cron: str, timezone: str, paused: bool) -> list:
    return [Cron(cron, timezone=timezone, active=not paused)] if flow_key == SCHEDULED else []


def ensure_work_pool(name: str, pool_type: str = "process") -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
            except ObjectAlreadyExists:
                pass


def deploy(work_pool: str = DEFAULT_POOL, cron: str = DEFAULT_CRON, timezone: str = "UTC",
           parameters: dict | None = None, source: str | Path = REPO, paused: bool = False) -> dict[str, str]:
    """Register every flow as a deployment on `work_pool`; returns {name: deployment id}."""
    ensure_work_pool(work_pool)
    ids = {}
    for key, flow in FLOWS.items():
        accepted = {name: value for name, value in (parameters or {}).items() if name in flow.parameters.properties}
        loaded = flow.from_source(source=str(source), entrypoint=f"flows/flows.py:{flow.fn.__name__}")
        ids[deployment_name(key)] = str(loaded.deploy(
            name=deployment_name(key), work_pool_name=work_pool, schedules=_schedules(key, cron, timezone, paused),
            parameters=accepted, tags=["resflow"], build=False, push=False, print_next_steps=False,
            description=(flow.description or "").strip().splitlines()[0] if flow.description else None,
        ))
    return ids


def serve(cron: str = DEFAULT_CRON, timezone: str = "UTC", parameters: dict | None = None) -> None:
    """Serve the deployments from this process (blocks; SIGTERM pauses their schedules)."""
    from prefect import serve as prefect_serve

    deployments = []
    for key, flow in FLOWS.items():
        accepted = {name: value for name, value in (parameters or {}).items() if name in flow.parameters.properties}
        deployments.append(flow.to_deployment(name=deployment_name(key), schedules=_schedules(key, cron, timezone, False),
                                              parameters=accepted, tags=["resflow"]))
    prefect_serve(*deployments)
