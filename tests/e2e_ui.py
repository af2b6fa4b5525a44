"""`make e2e`: the demo on the local stack, then the Prefect UI in headless Chromium.

    make e2e        # needs Debian's chromium (apt-get install chromium); screenshots in .e2e/

Starts the stack (S3, Prefect server, Ray head) in .e2e/stack, runs `make demo`'s flow
against it (1 minute of training), then loads two UI pages in headless Chromium: the
flow runs list and the `restore-summary` artifact. Each page is rendered twice: once to
a screenshot (.e2e/flow-runs.png, .e2e/artifact-preview.png) and once to its DOM, which
is checked for the nightly, train, challenge and restore runs and for the embedded
before/after JPEG previews. Exits 0 with a notice when Chromium is absent, unless
RESFLOW_E2E_REQUIRE=1. The stack is stopped at the end, pass or fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / ".e2e"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000", "--virtual-time-budget=20000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(browser: str, url: str, screenshot: Path) -> str:
    """Screenshot the page and return its DOM after scripts ran."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=120, check=True)
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=120, check=True).stdout


def main() -> int:
    browser = chromium()
    if not browser:
        print("make e2e: chromium not found (apt-get install chromium); skipped", file=sys.stderr)
        return 1 if os.environ.get("RESFLOW_E2E_REQUIRE") else 0
    from local import stack

    OUT.mkdir(exist_ok=True)
    state_dir = OUT / "stack"
    failures = []
    try:
        state = stack.up(state_dir)
        env = {**os.environ, **stack.env(state_dir), "RESFLOW_DEMO_MINUTES": os.environ.get("RESFLOW_DEMO_MINUTES", "1"),
               "RESFLOW_STACK_DIR": str(state_dir)}
        subprocess.run([sys.executable, "-m", "flows.demo"], env=env, check=True, cwd=REPO)
        os.environ.update(stack.env(state_dir))
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
            flows = {flow.id: flow.name for flow in client.read_flows()}
            summaries = [a for a in client.read_artifacts() if a.key == "restore-summary"]
        completed = {flows[run.flow_id] for run in runs if run.state and run.state.is_completed()}
        expected = {"resflow-nightly", "resflow-train", "resflow-challenge", "resflow-restore"}
        if not expected <= completed:
            failures.append(f"completed flow runs {sorted(completed)} lack {sorted(expected - completed)}")
        ui = state["prefect_ui"]
        runs_dom = render(browser, f"{ui}/runs", OUT / "flow-runs.png")
        for name in expected:
            if name not in runs_dom:
                failures.append(f"the flow runs page does not show {name}")
        if not summaries:
            failures.append("no restore-summary artifact")
        else:
            artifact_dom = render(browser, f"{ui}/artifacts/artifact/{summaries[0].id}", OUT / "artifact-preview.png")
            previews = artifact_dom.count('src="data:image/jpeg;base64,')
            if previews < 2:
                failures.append(f"the artifact page shows {previews} preview image(s), expected before and after")
            print(f"artifact page: {previews} preview images rendered")
        print(f"screenshots: {OUT / 'flow-runs.png'}, {OUT / 'artifact-preview.png'}")
    finally:
        stack.down(state_dir)
    for failure in failures:
        print(f"e2e FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
