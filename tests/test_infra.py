"""infra/: the manifests validate against the real KubeRay CRDs and the Ray cluster
launcher schema, and name images, commands and entry points that exist in the code."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.cli import build_parser
from tests.conftest import REPO, SHARED_DATA

INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
SCHEMAS = Path(SHARED_DATA).parent / "schemas" / "kuberay"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
IMAGE = f"ghcr.io/resflow/resflow:{PROJECT['version']}"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def crd_schema(kind: str, version: str) -> dict:
    if not SCHEMAS.exists():
        pytest.fail(f"the KubeRay CRDs are missing at {SCHEMAS}")
    for path in SCHEMAS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            for entry in crd["spec"]["versions"]:
                if entry["name"] == version and entry.get("served"):
                    return entry["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no served CRD version {version} of {kind} in {SCHEMAS}")


def unknown_fields(instance, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would prune or reject: not in the structural schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(instance, dict) and "properties" in schema:
        for key, value in instance.items():
            if key in schema["properties"]:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{path}.{key}")
    elif isinstance(instance, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in instance.items():
            found += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for index, value in enumerate(instance):
            found += unknown_fields(value, schema["items"], f"{path}[{index}]")
    return found


def kuberay_manifests() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in documents(path)
            if doc["apiVersion"].startswith("ray.io/")]


def containers(node) -> list[dict]:
    """Every container spec anywhere in a manifest."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "containers":
                found += value
            else:
                found += containers(value)
    elif isinstance(node, list):
        for value in node:
            found += containers(value)
    return found


def entrypoints(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["entrypoint"]] if "entrypoint" in node else []) + [
            e for key, value in node.items() if key != "entrypoint" for e in entrypoints(value)]
    return []


def test_there_are_raycluster_rayjob_and_raycronjob_manifests():
    kinds = {doc["kind"] for _, doc in kuberay_manifests()}
    assert {"RayCluster", "RayJob", "RayCronJob"} <= kinds


@pytest.mark.parametrize("name,manifest", kuberay_manifests(), ids=lambda value: value if isinstance(value, str) else "")
def test_kuberay_manifest_validates_against_its_crd(name, manifest):
    version = manifest["apiVersion"].split("/")[1]
    schema = crd_schema(manifest["kind"], version)
    errors = sorted(error.message for error in jsonschema.Draft7Validator(schema).iter_errors(manifest))
    assert errors == [], f"{name}: {errors}"
    assert unknown_fields(manifest, schema) == [], f"{name}: fields the CRD does not know"


def test_the_raycluster_autoscales_gpu_workers_from_zero_on_a_cpu_free_head():
    cluster = next(doc for _, doc in kuberay_manifests() if doc["kind"] == "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 2
    [container] = gpu["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    assert "cpu" in groups and "nvidia.com/gpu" not in json.dumps(groups["cpu"])


def test_every_container_runs_the_project_image_with_s3_credentials_from_a_secret():
    for name, manifest in kuberay_manifests() + [("worker.yaml", d) for d in documents(INFRA / "prefect/worker.yaml")]:
        for container in containers(manifest):
            assert container["image"] == IMAGE, f"{name}: {container['image']}"
            text = json.dumps(container)
            assert "AWS_SECRET_ACCESS_KEY" not in text or "secretKeyRef" in text, f"{name}: a literal credential"
        for container in containers(manifest):
            if container["name"].startswith("ray-"):
                assert {"secretRef": {"name": "resflow-s3"}} in container.get("envFrom", []), name


def test_every_entrypoint_is_a_valid_resflow_command():
    parser = build_parser()
    found = [(name, entry) for name, manifest in kuberay_manifests() for entry in entrypoints(manifest["spec"])]
    assert len(found) >= 3
    for name, entry in found:
        argv = shlex.split(entry)
        assert argv[:3] == ["python", "-m", "pipeline.cli"], f"{name}: {entry}"
        try:
            parser.parse_args(argv[3:])
        except SystemExit as error:
            raise AssertionError(f"{name}: `{entry}` is not a valid resflow command") from error


def test_dockerfile_is_pinned_and_consistent_with_the_project():
    dockerfile = (INFRA / "docker/Dockerfile").read_text()
    ray_pin = next(dep for dep in PROJECT["dependencies"] if dep.startswith("ray[")).split("==")[1]
    [base] = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert base == f"rayproject/ray:{ray_pin}-py311-gpu"
    torch_pin = (REPO / "constraints-cpu.txt").read_text().split("torch==")[1].split()[0]
    assert f"ARG TORCH_VERSION={torch_pin}" in dockerfile
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, flags=re.M):
        for item in source.split():
            assert (REPO / item).exists(), f"the Dockerfile copies {item}, which does not exist"
    assert not re.search(r"^ENV .*AWS_(SECRET|ACCESS)", dockerfile, flags=re.M)


def test_launcher_yaml_passes_the_ray_cluster_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "aws/cluster.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own schema, after the launcher's defaults
    assert config["provider"]["type"] == "aws" and config["docker"]["image"] == IMAGE
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all("InstanceType" in t["node_config"] and "IamInstanceProfile" in t["node_config"] for t in gpu)
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    assert "aws_secret" not in json.dumps(config).lower()


def test_prefect_work_pool_worker_and_deployments_fit_together():
    template = json.loads((INFRA / "prefect/base-job-template.json").read_text())
    assert template["variables"]["properties"]["image"]["default"] == IMAGE
    assert template["variables"]["properties"]["env"]["default"]["RAY_ADDRESS"].endswith(":8265")
    [worker] = [d for d in documents(INFRA / "prefect/worker.yaml") if d["kind"] == "Deployment"]
    command = containers(worker)[0]["command"]
    pool = command[command.index("--pool") + 1]
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    from flows import flows

    for deployment in project["deployments"]:
        assert deployment["work_pool"]["name"] == pool
        path, function = deployment["entrypoint"].split(":")
        assert (REPO / path).exists()
        flow = getattr(flows, function)
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties), deployment["name"]
    [nightly] = [d for d in project["deployments"] if d["name"] == "resflow-nightly"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
