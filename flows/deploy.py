"""Deployments: the nightly schedule and on-demand train/restore/evaluate/challenge runs.

    # a Prefect server and a process work pool (the UI at http://127.0.0.1:4200)
    resflow up                                  # or: prefect server start
    resflow deploy --cron "0 2 * * *" --timezone Europe/Berlin --param input=s3://bucket/incoming
    prefect worker start --pool resflow         # runs what the schedule and the UI start
    # one machine, no work pool: this process serves the deployments until stopped
    resflow serve --cron "0 2 * * *"

`deploy` registers deployments on a work pool (created as a `process` pool when
missing; on Kubernetes a `kubernetes` pool, see infra/README.md). Their code comes from
`--source`, the folder holding `flows/` (this checkout by default; `/app` in the
container image). Parameters given with `--param` become the deployments' defaults, and
every one stays editable in the UI's "Run" form and on the deployment; a name no flow
takes is refused. `--gpu` makes the GPU deployments' defaults (`GPU_PARAMETERS`): restore
on GPU replicas, train the `dncnn-paper` preset on GPU workers. This module is the one
place deployments are defined.

`--notify-url URL` also sets up Prefect automations (`ensure_alerts`): a nightly run that
fails or crashes, or is still running `--overdue-minutes` after it started, sends a
notification through a webhook block (Slack, Teams and email work the same way, through
their own notification blocks).
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


def deployment_name(flow_key: str, suffix: str = "") -> str:
    """`resflow-<flow>`, and `-<suffix>` when one Prefect server holds several installations
    (infra/k8s: dev deploys with `--name-suffix dev`, so it never replaces prod's deployments)."""
    return f"resflow-{flow_key}" + (f"-{suffix}" if suffix else "")


# The GPU cluster's defaults (`--gpu`); a --param given by hand wins over them.
GPU_PARAMETERS = {
    "nightly": {"use_gpu": True, "train_preset": "dncnn-paper", "train_minutes": 240},
    "restore": {"use_gpu": True},
    "train": {"use_gpu": True, "preset": "dncnn-paper", "max_minutes": 240},
}


def parse_params(pairs: list[str], flows: dict = FLOWS) -> dict:
    """`key=value` pairs; values are JSON when they parse (numbers, true, null), else
    strings. A name that none of `flows` takes is an error that lists the ones they do."""
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--param expects key=value, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    known = sorted({name for flow in flows.values() for name in flow.parameters.properties})
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; the flows take: {', '.join(known)}")
    return params


def _deployments(cron: str, timezone: str, parameters: dict | None, paused: bool, gpu: bool, suffix: str = ""):
    """(flow, deployment name, schedules, default parameters) for every flow."""
    for key, flow in FLOWS.items():
        defaults = {**(GPU_PARAMETERS.get(key, {}) if gpu else {}), **(parameters or {})}
        accepted = {name: value for name, value in defaults.items() if name in flow.parameters.properties}
        yield flow, deployment_name(key, suffix), _schedules(key, cron, timezone, paused), accepted


ALERT_BLOCK = "resflow-nightly-alerts"  # the notification block's name
ALERTS = ("resflow-nightly-failed", "resflow-nightly-overdue")  # the automations' names
TERMINAL_EVENTS = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Crashed",
                   "prefect.flow-run.Cancelled"}


def alert_names(suffix: str = "") -> tuple[str, tuple[str, str]]:
    """The notification block's name and the automations' names of one installation."""
    tail = f"-{suffix}" if suffix else ""
    return ALERT_BLOCK + tail, (ALERTS[0] + tail, ALERTS[1] + tail)


def ensure_alerts(notify_url: str, overdue_minutes: float = 360.0, flow_name: str = "resflow-nightly",
                  name_suffix: str = "") -> list[str]:
    """(Re)create the automations that say when a nightly run goes wrong; returns their ids.
    They match every run of the nightly flow, from any deployment or by hand; with a
    `name_suffix` (one installation among several on one server) they have names of their own
    and match only runs of that installation's nightly deployment."""
    from datetime import timedelta

    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    block = CustomWebhookNotificationBlock(name="resflow nightly", url=notify_url,
                                           json_data={"text": "{{subject}}", "body": "{{body}}"})
    block_name, names = alert_names(name_suffix)
    block_id = block.save(block_name, overwrite=True)
    of_the_flow = ({"prefect.resource.role": "deployment", "prefect.resource.name": deployment_name(SCHEDULED, name_suffix)}
                   if name_suffix else {"prefect.resource.role": "flow", "prefect.resource.name": flow_name})
    notify = SendNotification(
        block_document_id=block_id,
        subject="resflow: nightly run {{ flow_run.name }} is {{ flow_run.state.name }}",
        body="Flow run {{ flow_run.name }} ({{ flow_run.id }}) of {{ flow.name }}: state {{ flow_run.state.name }}, "
             "{{ flow_run.state.message }}")
    automations = [
        AutomationCore(name=names[0], description="a nightly run failed or crashed", actions=[notify],
                       trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                                            match_related=of_the_flow, posture=Posture.Reactive, threshold=1)),
        AutomationCore(name=names[1], description=f"a nightly run still running after {overdue_minutes:g} min",
                       actions=[notify],
                       trigger=EventTrigger(after={"prefect.flow-run.Running"}, expect=TERMINAL_EVENTS,
                                            for_each={"prefect.resource.id"}, match_related=of_the_flow,
                                            posture=Posture.Proactive, threshold=1,
                                            within=timedelta(minutes=overdue_minutes))),
    ]
    ids = []
    with get_client(sync_client=True) as client:
        for automation in automations:
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            ids.append(str(client.create_automation(automation)))
    return ids


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
           parameters: dict | None = None, source: str | Path = REPO, paused: bool = False,
           gpu: bool = False, name_suffix: str = "") -> dict[str, str]:
    """Register every flow as a deployment on `work_pool`; returns {name: deployment id}."""
    ensure_work_pool(work_pool)
    ids = {}
    for flow, name, schedules, defaults in _deployments(cron, timezone, parameters, paused, gpu, name_suffix):
        loaded = flow.from_source(source=str(source), entrypoint=f"flows/flows.py:{flow.fn.__name__}")
        ids[name] = str(loaded.deploy(
            name=name, work_pool_name=work_pool, schedules=schedules, parameters=defaults, tags=["resflow"],
            build=False, push=False, print_next_steps=False,
            description=(flow.description or "").strip().splitlines()[0] if flow.description else None,
        ))
    return ids


def serve(cron: str = DEFAULT_CRON, timezone: str = "UTC", parameters: dict | None = None, gpu: bool = False) -> None:
    """Serve the deployments from this process (blocks; SIGTERM pauses their schedules)."""
    from prefect import serve as prefect_serve

    prefect_serve(*[flow.to_deployment(name=name, schedules=schedules, parameters=defaults, tags=["resflow"])
                    for flow, name, schedules, defaults in _deployments(cron, timezone, parameters, False, gpu)])
