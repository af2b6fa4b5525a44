"""infra/: what `kubectl apply -k infra/k8s/overlays/<env>` creates is accepted by the KubeRay
operator (its CRD schemas and the rules of its validation.go), is secured (Ray token auth,
NetworkPolicy, securityContext, service accounts, credentials only from Secrets), is packaged
once (kustomize base + overlays, locked images), and names commands and entry points that exist.

    python -m pytest -q tests/test_infra.py

The committed render (infra/k8s/rendered/, from infra/k8s/render.sh) is what is validated; where
kustomize or kubectl is installed, a fresh render must equal it. The operator rules below are
KubeRay 1.7.0's ray-operator/controllers/ray/utils/validation.go (../shared/schemas/kuberay/
upstream/), rewritten in Python; each rule also runs against a broken copy of one of our
manifests, so a rule that never fires cannot pass unnoticed.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import zoneinfo
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
RENDERED = K8S / "rendered"
DOCKER = INFRA / "docker"
SHARED = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data")).parent
SCHEMAS = SHARED / "schemas" / "kuberay"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

# Each committed render and the kustomization it comes from.
RENDERS = {"prod.yaml": "overlays/prod", "prod-jobs.yaml": "overlays/prod/jobs",
           "dev.yaml": "overlays/dev", "dev-jobs.yaml": "overlays/dev/jobs"}
KUBERAY_VERSION = "1.7.0"  # the operator whose CRDs and validation.go are in ../shared/schemas/kuberay
WORK_POOL = "resflow-k8s"
WORK_POOLS = {"prod": WORK_POOL, "dev": "resflow-dev-k8s"}  # one work pool per installation
RAY_TOKEN = {"secretKeyRef": {"name": "resflow-ray-token", "key": "auth_token"}}
S3_SECRET = {"secretRef": {"name": "resflow-s3"}}
FLOW_LABEL = ("app.kubernetes.io/component", "resflow-flow")
RAY_UID = 1000  # the rayproject image's `ray` user; Dockerfile.worker creates the same uid


# ---------------------------------------------------------------------------------------------
# Reading manifests


def documents(path: Path) -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc]


@functools.cache
def parsed_render(name: str) -> tuple[dict, ...]:
    return tuple(documents(RENDERED / name))


def rendered(name: str) -> list[dict]:
    """The committed render's documents (a fresh copy each call: tests may change them)."""
    return copy.deepcopy(list(parsed_render(name)))


def all_rendered() -> list[tuple[str, dict]]:
    return [(name, doc) for name in RENDERS for doc in rendered(name)]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def release(overlay: str) -> dict:
    """The overlay's release component: the one place its namespace and images are written."""
    component = yaml.safe_load((K8S / "overlays" / overlay / "release" / "kustomization.yaml").read_text())
    images = {image["name"]: f"{image['newName']}:{image['newTag']}" for image in component["images"]}
    return {"namespace": component["namespace"], "images": images}


def feature_gates() -> dict[str, bool]:
    """The gates our operator runs with (infra/k8s/kuberay-operator-values.yaml)."""
    values = yaml.safe_load((K8S / "kuberay-operator-values.yaml").read_text())
    return {gate["name"]: gate["enabled"] for gate in values["featureGates"]}


def cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    """Every RayClusterSpec in a KubeRay object."""
    if not doc["apiVersion"].startswith("ray.io/"):
        return []
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [("spec", spec)]
    job = spec["jobTemplate"] if doc["kind"] == "RayCronJob" else spec
    return [("rayClusterSpec", job["rayClusterSpec"])] if job.get("rayClusterSpec") else []


def job_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayJob":
        return [doc["spec"]]
    if doc["kind"] == "RayCronJob":
        return [doc["spec"]["jobTemplate"]]
    return []


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod a manifest makes, directly or through an operator."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in ("Deployment", "Job"):
        return [(name, doc["spec"]["template"])]
    if not doc["apiVersion"].startswith("ray.io/"):
        return []
    found = []
    for where, spec in cluster_specs(doc):
        found.append((f"{name} {where} head", spec["headGroupSpec"]["template"]))
        found += [(f"{name} {where} group {group['groupName']}", group["template"])
                  for group in spec.get("workerGroupSpecs", [])]
    for job in job_specs(doc):
        if job.get("submitterPodTemplate"):
            found.append((f"{name} submitter", job["submitterPodTemplate"]))
    return found


def containers_of(pod_template: dict) -> list[dict]:
    spec = pod_template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict) -> dict:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def configmap_file(docs, prefix: str, key: str) -> str:
    """A file of a generated ConfigMap (kustomize appends a content hash to its name)."""
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix + "-")]
    return config["data"][key]


def flow_run_configuration(overlay: str, tmp_path: Path, job_variables: dict | None = None):
    """The job configuration the Prefect worker builds for a flow run: the pool's base job
    template as the worker pod stores it (start_worker.py, with the overlay's namespace and flow
    image), filled by Prefect's own code (`from_template_and_values`: the variables' defaults,
    then a deployment's `job_variables`, `env` merged as Prefect merges it)."""
    import asyncio

    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.workers.base import BaseJobConfiguration
    from pydantic import ConfigDict

    class KubernetesJobConfiguration(BaseJobConfiguration):
        """prefect-kubernetes' fields (job_manifest, namespace, ...) kept as they come."""
        model_config = ConfigDict(extra="allow")

    docs = rendered(f"{overlay}.yaml")
    worker = one(docs, "Deployment", "resflow-prefect-worker")
    [container] = worker["spec"]["template"]["spec"]["containers"]
    start_worker = load_start_worker(configmap_file(docs, "resflow-prefect-worker", "start_worker.py"), tmp_path)
    template_path = tmp_path / "base-job-template.json"
    template_path.write_text(configmap_file(docs, "resflow-prefect-worker", "base-job-template.json"))
    template = start_worker.job_template(release(overlay)["namespace"], env_of(container)["RESFLOW_FLOW_IMAGE"],
                                         template_path)
    WorkPoolCreate(name=WORK_POOL, type="kubernetes", base_job_template=template)  # what the Prefect API checks
    # the template has no block or variable references, so the client is never called
    return asyncio.run(KubernetesJobConfiguration.from_template_and_values(template, job_variables or {},
                                                                           client=object()))


def flow_run_job(overlay: str, tmp_path: Path, job_variables: dict | None = None) -> dict:
    """The Kubernetes Job the Prefect worker starts for a flow run of a deployment with these
    job variables (none: the template's defaults)."""
    return flow_run_configuration(overlay, tmp_path, job_variables).job_manifest


def load_start_worker(source: str, tmp_path: Path):
    import importlib.util

    path = tmp_path / "start_worker.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("start_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# The CRD schemas


@functools.cache
def crd_schema(kind: str, version: str) -> dict:
    if not SCHEMAS.exists():
        pytest.fail(f"the KubeRay CRDs are missing at {SCHEMAS} (set RESFLOW_SHARED_DATA)")
    for path in SCHEMAS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if crd["spec"]["names"]["kind"] == kind:
            for entry in crd["spec"]["versions"]:
                if entry["name"] == version and entry.get("served"):
                    return entry["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no served CRD version {version} of {kind} in {SCHEMAS}")


def pod_template_schema() -> dict:
    """core/v1 PodTemplateSpec as the API server knows it (embedded in the RayCluster CRD)."""
    schema = crd_schema("RayCluster", "v1")
    return schema["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]


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


def schema_errors(instance: dict, schema: dict) -> list[str]:
    errors = sorted(f"{'.'.join(map(str, e.path))}: {e.message}"
                    for e in jsonschema.Draft7Validator(schema).iter_errors(instance))
    return errors + [f"{field}: unknown field" for field in unknown_fields(instance, schema)]


# ---------------------------------------------------------------------------------------------
# The KubeRay operator's rules (validation.go of KubeRay 1.7.0), beyond its CRD schemas.
# Each function returns the operator's reasons to refuse the object; [] means accepted.

MAX_RAYCLUSTER_NAME = 53  # utils.MaxRayClusterNameLength: 63 - len("-serve-svc")
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # the RayJob's cluster is <name>-<5 chars>
MAX_RAYCRONJOB_NAME = MAX_RAYJOB_NAME - 11  # the cron's RayJobs are <name>-<10 chars>
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
# Gates whose features this file checks only as "refused": turning one on in the Helm values
# means encoding the rules behind it first (see ray_cluster_spec_errors).
GATED_OFF = ("RayClusterHistoryServer", "RayClusterNetworkPolicy", "RayClusterMTLS", "GCSFaultToleranceEmbeddedStorage")


def is_dns1035_label(value: str) -> bool:
    return len(value) <= 63 and bool(DNS1035_LABEL.match(value))


def is_label_key(key: str) -> bool:  # validation.IsQualifiedName
    prefix, slash, name = key.rpartition("/")
    if slash and not (prefix and len(prefix) <= 253 and DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(LABEL_NAME.match(name))


def is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and bool(LABEL_NAME.match(value)))


def generic_version(text: str) -> tuple[int, ...] | None:
    """k8s.io/apimachinery version.ParseGeneric: two or more numeric fields, optional leading v."""
    match = re.fullmatch(r"\s*v?([0-9]+(?:\.[0-9]+)+)(.*?)\s*", text or "")
    if not match or any(len(f) > 1 and f.startswith("0") for f in match[1].split(".")):
        return None
    return tuple(int(field) for field in match[1].split("."))


def version_less(version: tuple[int, ...], minimum: str) -> bool:
    floor = tuple(int(f) for f in minimum.split("."))
    width = max(len(version), len(floor))
    return version + (0,) * (width - len(version)) < floor + (0,) * (width - len(floor))


def head_container(spec: dict) -> dict:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]  # utils.RayContainerIndex


def group_errors(group_name: str, group: dict) -> list[str]:
    """validateRayGroupResources and validateRayGroupLabels."""
    errors = []
    params = group.get("rayStartParams") or {}
    if any(params.get(key) for key in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
        errors.append(f"resource fields should not be set in both rayStartParams and Resources for {group_name} group")
    if "labels" in params:
        errors.append(f"rayStartParams['labels'] is not supported for {group_name} group")
    for key, value in (group.get("labels") or {}).items():
        if not is_label_key(key):
            errors.append(f"invalid label key for {group_name} group: '{key}'")
        if not is_label_value(str(value)):
            errors.append(f"invalid label value for key '{key}' in {group_name} group: '{value}'")
    return errors


def ray_cluster_spec_errors(spec: dict, annotations: dict | None = None,
                            gates: dict[str, bool] | None = None) -> list[str]:
    """ValidateRayClusterSpec."""
    gates = feature_gates() if gates is None else gates
    annotations = annotations or {}
    if not spec["headGroupSpec"].get("template", {}).get("spec", {}).get("containers"):
        return ["headGroupSpec should have at least one container"]
    errors = group_errors("Head", spec["headGroupSpec"])
    head = head_container(spec)
    head_env = env_of(head)
    head_params = spec["headGroupSpec"].get("rayStartParams") or {}
    autoscaling = spec.get("enableInTreeAutoscaling") is True
    options = spec.get("autoscalerOptions") or {}
    v2 = options.get("version") == "v2"
    v2_env = str(head_env.get(AUTOSCALER_V2_ENV)) in ("1", "true")
    groups = spec.get("workerGroupSpecs") or []
    for group in groups:
        name = group.get("groupName")
        if not group.get("template", {}).get("spec", {}).get("containers"):
            errors.append("workerGroupSpec should have at least one container")
            continue
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled")
        if low is not None and low < 0:
            errors.append(f"worker group {name} has negative minReplicas {low}")
        if high is not None and high < 0:
            errors.append(f"worker group {name} has negative maxReplicas {high}")
        if low is not None and high is not None and low > high:
            errors.append(f"worker group {name} has minReplicas {low} greater than maxReplicas {high}")
        errors += group_errors(name, group)
        idle = group.get("idleTimeoutSeconds")
        if idle is not None and idle < 0:
            errors.append(f"worker group {name}: idleTimeoutSeconds must be non-negative")
        elif idle is not None and not (v2 or v2_env):
            errors.append(f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled")
        if group.get("priority"):
            version = generic_version(spec.get("rayVersion", ""))
            if not spec.get("rayVersion"):
                errors.append(f"worker group {name}: priority is set, but RayVersion was not specified")
            elif version is None:
                errors.append(f"worker group {name}: priority is set, but RayVersion format is invalid")
            elif version_less(version, "2.56.0"):
                errors.append(f"worker group {name}: priority is set, but minimum Ray version is 2.56.0")
            elif not (v2 or v2_env):
                errors.append(f"worker group {name}: priority is set, but autoscaler v2 is not enabled")

    gcs = spec.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and gcs is not None:
        errors.append("ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set")
    fault_tolerant = str(annotations.get("ray.io/ft-enabled", "")).lower() == "true" or gcs is not None
    if not fault_tolerant and "RAY_REDIS_ADDRESS" in head_env:
        errors.append("RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, but GcsFaultToleranceOptions is not set")
    if gcs is not None:
        if head_params.get("redis-password"):
            errors.append("cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled")
        if "REDIS_PASSWORD" in head_env:
            errors.append("cannot set `REDIS_PASSWORD` env var in head Pod when GcsFaultToleranceOptions is enabled")
        if "RAY_REDIS_ADDRESS" in head_env:
            errors.append("cannot set `RAY_REDIS_ADDRESS` env var in head Pod when GcsFaultToleranceOptions is enabled")
        if annotations.get("ray.io/external-storage-namespace"):
            errors.append("cannot set `ray.io/external-storage-namespace` annotation when GcsFaultToleranceOptions is enabled")
        if gcs.get("backend") == "rocksdb" and not gates.get("GCSFaultToleranceEmbeddedStorage"):
            # the backend's own rules (validateGcsFaultToleranceBackend) sit behind this gate
            errors.append("the embedded RocksDB GCS fault tolerance backend requires the GCSFaultToleranceEmbeddedStorage feature gate")
        elif gcs.get("storage"):
            errors.append("cannot set GcsFaultToleranceOptions.Storage when backend is 'redis'")
    if head_params.get("redis-username") or "REDIS_USERNAME" in head_env:
        errors.append("cannot set redis username in rayStartParams or environment variables")

    suspended = [g.get("groupName") for g in groups if g.get("suspend")]
    if suspended and not gates.get("RayJobDeletionPolicy"):
        errors.append(f"worker group {suspended[0]} can be suspended only when the RayJobDeletionPolicy feature gate is enabled")
    if not autoscaling and v2_env:
        errors.append(f"environment variable {AUTOSCALER_V2_ENV} cannot be set to '{head_env[AUTOSCALER_V2_ENV]}' when enableInTreeAutoscaling is false")
    if autoscaling:
        if suspended:
            errors.append(f"worker group {suspended[0]} cannot be suspended with Autoscaler enabled")
        if options.get("version") and AUTOSCALER_V2_ENV in head_env:
            errors.append(f"both .spec.autoscalerOptions.version and head Pod env var {AUTOSCALER_V2_ENV} are set")
        if v2:
            if spec["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never") != "Never":
                errors.append("restartPolicy for head Pod should be Never or unset when using autoscaler V2")
            for group in groups:
                if group["template"]["spec"].get("restartPolicy", "Never") != "Never":
                    errors.append(f"restartPolicy for worker group {group.get('groupName')} should be Never or unset when using autoscaler V2")
    if options.get("idleTimeoutSeconds", 0) < 0:
        errors.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in env_of(options):
        errors.append("autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD")

    auth = spec.get("authOptions") or {}
    k8s_auth = auth.get("enableK8sTokenAuth") is True
    if auth.get("mode") == "token":
        version = generic_version(spec.get("rayVersion", ""))
        if not spec.get("rayVersion"):
            errors.append("authOptions.mode is 'token' but RayVersion was not specified")
        elif version is None:
            errors.append(f"authOptions.mode is 'token' but RayVersion format is invalid: {spec['rayVersion']}")
        elif version_less(version, "2.52.0"):
            errors.append(f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {spec['rayVersion']}")
        elif k8s_auth and version_less(version, "2.55.0"):
            errors.append("authOptions.enableK8sTokenAuth is enabled but minimum Ray version is 2.55.0")
        if k8s_auth and auth.get("secretName"):
            errors.append("authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also set")
    elif k8s_auth:
        errors.append("authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'")

    # Features behind gates our operator runs without (GATED_OFF): the gate rule refuses the whole
    # field, so the rules behind it (collector options, NetworkPolicy modes, TLS env) are not needed.
    for field, gate in (("historyServerOptions", "RayClusterHistoryServer"), ("networkPolicy", "RayClusterNetworkPolicy"),
                        ("tlsOptions", "RayClusterMTLS")):
        if spec.get(field) is not None and not gates.get(gate):
            errors.append(f"spec.{field} requires the {gate} feature gate to be enabled")
    return errors


def upgrade_strategy_errors(spec: dict, created_by_rayjob: bool) -> list[str]:
    """ValidateRayClusterUpgradeOptions."""
    kind = (spec.get("upgradeStrategy") or {}).get("type")
    if kind is None:
        return []
    if kind not in ("Recreate", "None"):
        return [f"Spec.UpgradeStrategy.Type value {kind} is invalid, valid options are Recreate or None"]
    return ["upgradeStrategy cannot be set when RayCluster is created by RayJob"] if created_by_rayjob else []


def deletion_errors(job: dict, gates: dict[str, bool]) -> list[str]:
    """validateDeletionConfiguration, validateDeletionRules, validateLegacyDeletionPolicies."""
    shutdown = job.get("shutdownAfterJobFinishes", False)
    if not shutdown and job.get("ttlSecondsAfterFinished", 0) > 0:
        return ["a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"]
    strategy = job.get("deletionStrategy")
    if strategy is None:
        return []
    if not gates.get("RayJobDeletionPolicy"):
        return ["RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy"]
    selector = bool(job.get("clusterSelector"))
    autoscaling = (job.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling") is True
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    rules = strategy.get("deletionRules") or []
    if rules and shutdown:
        return ["spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive"]
    if rules and legacy:
        return ["Cannot use both legacy onSuccess/onFailure fields and deletionRules simultaneously"]
    if legacy:
        if "onSuccess" not in strategy or "onFailure" not in strategy:
            return ["both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set"]
        on_success, on_failure = strategy["onSuccess"].get("policy"), strategy["onFailure"].get("policy")
        if on_success is None or on_failure is None:
            return ["the DeletionPolicyType field of DeletionStrategy.OnSuccess/OnFailure cannot be unset"]
        if selector and {on_success, on_failure} & {"DeleteCluster", "DeleteWorkers"}:
            return ["the ClusterSelector mode doesn't support DeletionStrategy=DeleteCluster/DeleteWorkers"]
        if "DeleteWorkers" in (on_success, on_failure) and autoscaling:
            return ["DeletionStrategy=DeleteWorkers currently does not support RayCluster with autoscaling enabled"]
        if shutdown and "DeleteNone" in (on_success, on_failure):
            return ["shutdownAfterJobFinshes is set to 'true' while deletion policy is 'DeleteNone'"]
        return []
    if not rules:
        return ["DeletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules field"]
    errors, seen = [], {}
    for index, rule in enumerate(rules):
        condition = rule.get("condition") or {}
        statuses = [k for k in ("jobStatus", "jobDeploymentStatus") if k in condition]
        if len(statuses) == 2:
            errors.append(f"deletionRules[{index}]: cannot set both JobStatus and JobDeploymentStatus at the same time")
            continue
        if not statuses:
            errors.append(f"deletionRules[{index}]: exactly one of JobStatus and JobDeploymentStatus must be set")
            continue
        if condition.get("ttlSeconds", 0) < 0:
            errors.append(f"deletionRules[{index}]: TTLSeconds must be non-negative")
            continue
        policy = rule.get("policy")
        if selector and policy in ("DeleteCluster", "DeleteWorkers"):
            errors.append(f"deletionRules[{index}]: DeletionPolicyType '{policy}' not supported when ClusterSelector is set")
            continue
        if autoscaling and policy == "DeleteWorkers":
            errors.append(f"deletionRules[{index}]: DeletionPolicyType 'DeleteWorkers' not supported with autoscaling enabled")
            continue
        status = (statuses[0], condition[statuses[0]])
        if policy in seen.setdefault(status, {}):
            errors.append(f"deletionRules[{index}]: duplicate rule for DeletionPolicyType '{policy}' and {status[0]} '{status[1]}'")
            continue
        seen[status][policy] = condition.get("ttlSeconds", 0)
    for status, ttls in seen.items():
        order = [ttls[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in ttls]
        if order != sorted(order):
            errors.append(f"for {status[0]} '{status[1]}': TTLs must follow DeleteWorkers <= DeleteCluster <= DeleteSelf")
    return errors


def ray_job_spec_errors(job: dict, annotations: dict | None = None,
                        gates: dict[str, bool] | None = None) -> list[str]:
    """ValidateRayJobSpec."""
    gates = feature_gates() if gates is None else gates
    errors = []
    shutdown = job.get("shutdownAfterJobFinishes", False)
    selector = job.get("clusterSelector") or {}
    mode = job.get("submissionMode", "K8sJobMode")
    backoff = job.get("backoffLimit")
    cluster = job.get("rayClusterSpec")
    if job.get("suspend") and not shutdown:
        errors.append("a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended")
    if job.get("ttlSecondsAfterFinished", 0) < 0:
        errors.append("TTLSecondsAfterFinished must be a non-negative integer")
    errors += deletion_errors(job, gates)
    if job.get("suspend") and selector:
        errors.append("the ClusterSelector mode doesn't support the suspend operation")
    if cluster is None and not selector:
        errors.append("one of RayClusterSpec or ClusterSelector must be set")
    if selector:
        if not selector.get("ray.io/cluster"):
            errors.append("cluster name in ClusterSelector should not be empty")
        if mode == "SidecarMode":
            errors.append("ClusterSelector is not supported in SidecarMode")
        if backoff is not None and backoff > 0:
            errors.append("BackoffLimit is incompatible with ClusterSelector mode")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        errors.append("BackoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        if job.get("submitterPodTemplate") is not None:
            errors.append("Currently, SidecarMode doesn't support SubmitterPodTemplate")
        if job.get("submitterConfig") is not None:
            errors.append("Currently, SidecarMode doesn't support SubmitterConfig")
        if cluster and cluster["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never") != "Never":
            errors.append("restartPolicy for head Pod should be Never or unset when using SidecarMode")
    if cluster is not None:
        if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth") is True:
            errors.append("K8s token auth mode is currently not supported for RayJob")
        errors += [f"rayClusterSpec: {e}" for e in ray_cluster_spec_errors(cluster, annotations, gates)]
        # the operator validates the cluster it creates for the job as a RayCluster created by a RayJob
        errors += [f"rayClusterSpec: {e}" for e in upgrade_strategy_errors(cluster, created_by_rayjob=True)]
    try:
        runtime_env = yaml.safe_load(job.get("runtimeEnvYAML") or "") or {}
        if not isinstance(runtime_env, dict):
            errors.append("runtimeEnvYAML is not a YAML mapping")
    except yaml.YAMLError as error:
        errors.append(f"runtimeEnvYAML is not valid YAML: {error}")
    if job.get("activeDeadlineSeconds") is not None and job["activeDeadlineSeconds"] <= 0:
        errors.append("activeDeadlineSeconds must be a positive integer")
    if job.get("preRunningDeadlineSeconds") is not None and job["preRunningDeadlineSeconds"] <= 0:
        errors.append("preRunningDeadlineSeconds must be a positive integer")
    if backoff is not None and backoff < 0:
        errors.append("backoffLimit must be a positive integer")
    return errors


CRON_FIELDS = [(0, 59, {}), (0, 23, {}), (1, 31, {}),
               (1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
               (0, 6, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())})]
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_schedule_error(schedule: str) -> str | None:
    """robfig/cron/v3 ParseStandard: five fields, or a descriptor."""
    text = schedule.strip()
    if text.startswith("@"):
        if text in CRON_DESCRIPTORS or re.fullmatch(r"@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", text):
            return None
        return f"unrecognized descriptor: {text}"
    fields = text.split()
    if len(fields) != 5:
        return f"expected exactly 5 fields, found {len(fields)}: {text}"
    for field, (low, high, names) in zip(fields, CRON_FIELDS):
        for item in field.split(","):
            span, _, step = item.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return f"bad step: {item}"
            if span in ("*", "?"):
                continue
            start, dash, end = span.partition("-")
            try:
                bounds = [int(names.get(v.lower(), v)) for v in ([start, end] if dash else [start])]
            except ValueError:
                return f"failed to parse {item}"
            if any(not low <= b <= high for b in bounds) or bounds[0] > bounds[-1]:
                return f"{item} is out of range {low}-{high}"
    return None


def ray_cron_job_errors(cron: dict) -> list[str]:
    """ValidateRayCronJobSpec."""
    errors = []
    name, spec = cron["metadata"]["name"], cron["spec"]
    if len(name) > MAX_RAYCRONJOB_NAME:
        errors.append(f"RayCronJob name should be no more than {MAX_RAYCRONJOB_NAME} characters")
    if "TZ" in spec.get("schedule", ""):
        errors.append("cannot use TZ or CRON_TZ in schedule, use timeZone field instead")
    elif cron_schedule_error(spec.get("schedule", "")):
        errors.append(f"invalid cron schedule: {cron_schedule_error(spec.get('schedule', ''))}")
    if "timeZone" in spec:
        if spec["timeZone"] == "":
            errors.append("timeZone must not be empty string")
        else:
            try:
                zoneinfo.ZoneInfo(spec["timeZone"])
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                errors.append(f"invalid time zone: {spec['timeZone']}")
    return errors + [f"invalid RayJob template: {e}" for e in ray_job_spec_errors(spec["jobTemplate"])]


def metadata_errors(doc: dict) -> list[str]:
    """ValidateRayClusterMetadata / ValidateRayJobMetadata (RayCronJob: see ray_cron_job_errors)."""
    limit = {"RayCluster": MAX_RAYCLUSTER_NAME, "RayJob": MAX_RAYJOB_NAME}.get(doc["kind"])
    name = doc["metadata"]["name"]
    if limit is None:
        return []
    errors = [f"{doc['kind']} name should be no more than {limit} characters"] if len(name) > limit else []
    if not is_dns1035_label(name):
        errors.append(f"{doc['kind']} name should be a valid DNS1035 label")
    return errors


def operator_errors(doc: dict) -> list[str]:
    """Every reason KubeRay's operator would refuse this object."""
    annotations = doc["metadata"].get("annotations")
    if doc["kind"] == "RayCluster":
        return (metadata_errors(doc) + upgrade_strategy_errors(doc["spec"], created_by_rayjob=False)
                + ray_cluster_spec_errors(doc["spec"], annotations))
    if doc["kind"] == "RayJob":
        return metadata_errors(doc) + ray_job_spec_errors(doc["spec"], annotations)
    if doc["kind"] == "RayCronJob":
        return ray_cron_job_errors(doc)
    raise AssertionError(f"not a KubeRay object: {doc['kind']}")


def kuberay_objects() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in all_rendered() if doc["apiVersion"].startswith("ray.io/")]


def object_id(value) -> str:
    return value if isinstance(value, str) else f"{value['kind']}/{value['metadata']['name']}"


# ---------------------------------------------------------------------------------------------
# What the operator accepts


def test_the_renders_have_a_raycluster_rayjobs_and_a_raycronjob():
    for overlay in ("prod", "dev"):
        kinds = [doc["kind"] for doc in rendered(f"{overlay}.yaml") + rendered(f"{overlay}-jobs.yaml")]
        assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 2 and kinds.count("RayCronJob") == 1


@pytest.mark.parametrize("render,manifest", kuberay_objects(), ids=object_id)
def test_kuberay_object_passes_its_crd_schema(render, manifest):
    schema = crd_schema(manifest["kind"], manifest["apiVersion"].split("/")[1])
    assert schema_errors(manifest, schema) == [], render


@pytest.mark.parametrize("render,manifest", kuberay_objects(), ids=object_id)
def test_kuberay_object_passes_the_operators_own_rules(render, manifest):
    assert operator_errors(manifest) == [], render


def base(kind: str, name: str) -> dict:
    docs = rendered("prod.yaml") + rendered("prod-jobs.yaml")
    return copy.deepcopy(one(docs, kind, name))


def edit(doc: dict, changes: dict) -> dict:
    """Apply {dotted path: value} in order (list indexes as numbers; DELETE removes the key;
    a path ending in `+env` appends {name: value} pairs to that container's env)."""
    for path, value in changes.items():
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = doc
        for key in parents:
            node = node[key]
        if last == "+env":
            node.setdefault("env", []).extend({"name": k, "value": v} for k, v in value.items())
        elif value is DELETE:
            del node[last]
        else:
            node[last] = value
    return doc


DELETE = object()
RC, TRAIN = ("RayCluster", "resflow"), ("RayJob", "resflow-train")
RESTORE, CRON = ("RayJob", "resflow-restore"), ("RayCronJob", "resflow-nightly-restore")
GPU = "spec.workerGroupSpecs.0"
HEAD = "spec.headGroupSpec"
HEAD_CONTAINER = "spec.headGroupSpec.template.spec.containers.0"
TRAIN_CLUSTER = "spec.rayClusterSpec"
TRAIN_GPU = "spec.rayClusterSpec.workerGroupSpecs.0"
RULES = "spec.deletionStrategy.deletionRules"
TEMPLATE = "spec.jobTemplate"
FT = {"spec.gcsFaultToleranceOptions": {"redisAddress": "redis:6379"}}
V2 = {"spec.autoscalerOptions.version": "v2"}
SIDECAR = {"spec.submissionMode": "SidecarMode", "spec.submitterPodTemplate": DELETE}
NO_TTL = {"spec.shutdownAfterJobFinishes": False, "spec.ttlSecondsAfterFinished": 0}


def rules(*items) -> dict:
    return {"deletionRules": [{"policy": policy, "condition": condition} for policy, condition in items]}


# (case, manifest, changes, the operator's reason): each rule of validation.go that can apply to
# our RayCluster, RayJobs and RayCronJob, fired by a small change to a manifest that passes.
MUTATIONS = [
    # names
    ("raycluster-name-too-long", RC, {"metadata.name": "r" * 54}, "no more than 53 characters"),
    ("raycluster-name-not-dns1035", RC, {"metadata.name": "1resflow"}, "valid DNS1035 label"),
    ("rayjob-name-too-long", TRAIN, {"metadata.name": "r" * 48}, "no more than 47 characters"),
    ("rayjob-name-not-dns1035", TRAIN, {"metadata.name": "resflow.train"}, "valid DNS1035 label"),
    ("raycronjob-name-too-long", CRON, {"metadata.name": "r" * 37}, "no more than 36 characters"),
    # head and worker groups
    ("head-without-containers", RC, {f"{HEAD}.template.spec.containers": []},
     "headGroupSpec should have at least one container"),
    ("worker-group-without-containers", RC, {f"{GPU}.template.spec.containers": []},
     "workerGroupSpec should have at least one container"),
    ("head-resources-twice", RC, {f"{HEAD}.resources": {"CPU": "0"}}, "both rayStartParams and Resources for Head group"),
    ("worker-resources-twice", RC, {f"{GPU}.resources": {"GPU": "1"}}, "both rayStartParams and Resources for gpu group"),
    ("labels-in-rayStartParams", RC, {f"{GPU}.rayStartParams.labels": "a=b"}, "rayStartParams['labels'] is not supported"),
    ("invalid-group-label-key", RC, {f"{GPU}.labels": {"-bad": "x"}}, "invalid label key"),
    ("invalid-group-label-value", RC, {f"{HEAD}.labels": {"zone": "a b"}}, "invalid label value"),
    # replicas
    ("no-max-without-autoscaler", TRAIN, {f"{TRAIN_GPU}.maxReplicas": DELETE},
     "must set both minReplicas and maxReplicas when autoscaling is disabled"),
    ("negative-minReplicas", RC, {f"{GPU}.minReplicas": -1}, "negative minReplicas"),
    ("negative-maxReplicas", RC, {f"{GPU}.minReplicas": DELETE, f"{GPU}.maxReplicas": -1}, "negative maxReplicas"),
    ("min-above-max", TRAIN, {f"{TRAIN_GPU}.minReplicas": 5}, "minReplicas 5 greater than maxReplicas 4"),
    # autoscaler
    ("group-idle-timeout-without-v2", RC, {f"{GPU}.idleTimeoutSeconds": 60},
     "idleTimeoutSeconds is set, but autoscaler v2 is not enabled"),
    ("negative-group-idle-timeout", RC, {f"{GPU}.idleTimeoutSeconds": -1}, "idleTimeoutSeconds must be non-negative"),
    ("group-priority-without-v2", RC, {f"{GPU}.priority": 10}, "priority is set, but autoscaler v2 is not enabled"),
    ("group-priority-before-ray-2.56", RC, {f"{GPU}.priority": 10, "spec.rayVersion": "2.55.0"},
     "minimum Ray version is 2.56.0"),
    ("group-priority-without-ray-version", RC, {f"{GPU}.priority": 10, "spec.rayVersion": DELETE},
     "priority is set, but RayVersion was not specified"),
    ("suspended-group-with-autoscaler", RC, {f"{GPU}.suspend": True}, "cannot be suspended with Autoscaler enabled"),
    ("autoscaler-v2-env-without-autoscaler", TRAIN,
     {f"{TRAIN_CLUSTER}.headGroupSpec.template.spec.containers.0.+env": {AUTOSCALER_V2_ENV: "true"}},
     "cannot be set to 'true' when enableInTreeAutoscaling is false"),
    ("autoscaler-version-and-v2-env", RC, {**V2, f"{HEAD_CONTAINER}.+env": {AUTOSCALER_V2_ENV: "true"}},
     "both .spec.autoscalerOptions.version and head Pod env var"),
    ("v2-head-restart-always", RC, {**V2, f"{HEAD}.template.spec.restartPolicy": "Always"},
     "restartPolicy for head Pod should be Never or unset when using autoscaler V2"),
    ("v2-worker-restart-on-failure", RC, {**V2, f"{GPU}.template.spec.restartPolicy": "OnFailure"},
     "restartPolicy for worker group gpu should be Never"),
    ("negative-autoscaler-idle-timeout", RC, {"spec.autoscalerOptions.idleTimeoutSeconds": -5},
     "autoscalerOptions.idleTimeoutSeconds must be non-negative"),
    ("autoscaler-start-cmd-env", RC, {"spec.autoscalerOptions.+env": {"KUBERAY_GEN_AUTOSCALER_START_CMD": "x"}},
     "must not contain KUBERAY_GEN_AUTOSCALER_START_CMD"),
    # GCS fault tolerance and Redis
    ("ft-annotation-and-options", RC, {**FT, "metadata.annotations": {"ray.io/ft-enabled": "true"}},
     "annotation and GcsFaultToleranceOptions are both set"),
    ("redis-address-without-ft", RC, {f"{HEAD_CONTAINER}.+env": {"RAY_REDIS_ADDRESS": "redis:6379"}},
     "RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance"),
    ("redis-password-param-with-ft", RC, {**FT, f"{HEAD}.rayStartParams.redis-password": "x"},
     "cannot set `redis-password` in rayStartParams"),
    ("redis-password-env-with-ft", RC, {**FT, f"{HEAD_CONTAINER}.+env": {"REDIS_PASSWORD": "x"}},
     "cannot set `REDIS_PASSWORD` env var"),
    ("redis-address-env-with-ft", RC, {**FT, f"{HEAD_CONTAINER}.+env": {"RAY_REDIS_ADDRESS": "r:6379"}},
     "cannot set `RAY_REDIS_ADDRESS` env var"),
    ("storage-namespace-annotation-with-ft", RC, {**FT, "metadata.annotations": {"ray.io/external-storage-namespace": "n"}},
     "cannot set `ray.io/external-storage-namespace` annotation"),
    ("rocksdb-backend-without-gate", RC, {"spec.gcsFaultToleranceOptions": {"backend": "rocksdb"}},
     "requires the GCSFaultToleranceEmbeddedStorage feature gate"),
    ("redis-backend-with-storage", RC, {"spec.gcsFaultToleranceOptions": {"redisAddress": "r:6379", "storage": {"size": "1Gi"}}},
     "cannot set GcsFaultToleranceOptions.Storage when backend is 'redis'"),
    ("redis-username", RC, {f"{HEAD}.rayStartParams.redis-username": "ray"}, "cannot set redis username"),
    # features behind gates our operator runs without (infra/k8s/kuberay-operator-values.yaml)
    ("history-server-without-gate", RC, {"spec.historyServerOptions": {"collectorOptions": {"image": "x"}}},
     "requires the RayClusterHistoryServer feature gate"),
    ("network-policy-without-gate", RC, {"spec.networkPolicy": {"mode": "DenyAll"}},
     "requires the RayClusterNetworkPolicy feature gate"),
    ("tls-without-gate", RC, {"spec.tlsOptions": {"enabled": True}}, "requires the RayClusterMTLS feature gate"),
    ("upgrade-strategy-invalid", RC, {"spec.upgradeStrategy": {"type": "Rolling"}},
     "Spec.UpgradeStrategy.Type value Rolling is invalid"),
    ("upgrade-strategy-in-rayjob-cluster", TRAIN, {f"{TRAIN_CLUSTER}.upgradeStrategy": {"type": "Recreate"}},
     "upgradeStrategy cannot be set when RayCluster is created by RayJob"),
    # token auth
    ("token-auth-without-ray-version", RC, {"spec.rayVersion": DELETE}, "RayVersion was not specified"),
    ("token-auth-bad-ray-version", RC, {"spec.rayVersion": "latest"}, "RayVersion format is invalid"),
    ("token-auth-before-ray-2.52", TRAIN, {f"{TRAIN_CLUSTER}.rayVersion": "2.51.1"}, "minimum Ray version is 2.52.0"),
    ("k8s-token-auth-with-secret-name", RC, {"spec.authOptions.enableK8sTokenAuth": True},
     "enableK8sTokenAuth is enabled and authOptions.secretName is also set"),
    ("k8s-token-auth-before-ray-2.55", RC, {"spec.authOptions.enableK8sTokenAuth": True, "spec.authOptions.secretName": DELETE,
                                            "spec.rayVersion": "2.54.0"},
     "minimum Ray version is 2.55.0"),
    ("k8s-token-auth-without-token-mode", RC, {"spec.authOptions": {"enableK8sTokenAuth": True}},
     "enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"),
    ("k8s-token-auth-in-rayjob", TRAIN, {f"{TRAIN_CLUSTER}.authOptions": {"mode": "token", "enableK8sTokenAuth": True}},
     "K8s token auth mode is currently not supported for RayJob"),
    # TTL, shutdown, suspend: the two manifests before infra-17 broke the first of these rules
    ("old-rayjob-restore-ttl-without-shutdown", RESTORE, {"spec.ttlSecondsAfterFinished": 3600},
     "shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"),
    ("old-raycronjob-ttl-without-shutdown", CRON,
     {f"{TEMPLATE}.deletionStrategy": DELETE, f"{TEMPLATE}.ttlSecondsAfterFinished": 3600},
     "invalid RayJob template: a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"),
    ("old-train-ttl-without-shutdown", TRAIN, {"spec.ttlSecondsAfterFinished": 3600}, "cannot have TTLSecondsAfterFinished"),
    ("negative-ttl", TRAIN, {"spec.ttlSecondsAfterFinished": -1}, "TTLSecondsAfterFinished must be a non-negative"),
    ("suspend-without-shutdown", RESTORE, {"spec.suspend": True},
     "shutdownAfterJobFinishes set to false is not allowed to be suspended"),
    ("suspend-with-cluster-selector", RESTORE,
     {"spec.shutdownAfterJobFinishes": True, "spec.suspend": True},
     "the ClusterSelector mode doesn't support the suspend operation"),
    # clusterSelector vs rayClusterSpec, submission modes
    ("neither-cluster-spec-nor-selector", RESTORE, {"spec.clusterSelector": DELETE},
     "one of RayClusterSpec or ClusterSelector must be set"),
    ("empty-cluster-name-in-selector", RESTORE, {"spec.clusterSelector": {"ray.io/cluster": ""}},
     "cluster name in ClusterSelector should not be empty"),
    ("selector-without-cluster-key", CRON, {f"{TEMPLATE}.clusterSelector": {"app": "resflow"}},
     "cluster name in ClusterSelector should not be empty"),
    ("selector-in-sidecar-mode", RESTORE, SIDECAR, "ClusterSelector is not supported in SidecarMode"),
    ("backoff-with-selector", RESTORE, {"spec.backoffLimit": 2}, "BackoffLimit is incompatible with ClusterSelector mode"),
    ("backoff-in-interactive-mode", TRAIN, {"spec.submissionMode": "InteractiveMode"},
     "BackoffLimit is incompatible with InteractiveMode"),
    ("sidecar-mode-with-submitter-template", TRAIN, {"spec.submissionMode": "SidecarMode"},
     "SidecarMode doesn't support SubmitterPodTemplate"),
    ("sidecar-mode-with-submitter-config", TRAIN, {**SIDECAR, "spec.submitterConfig": {"backoffLimit": 1}},
     "SidecarMode doesn't support SubmitterConfig"),
    ("sidecar-mode-head-restart-always", TRAIN, {**SIDECAR, f"{TRAIN_CLUSTER}.headGroupSpec.template.spec.restartPolicy": "Always"},
     "restartPolicy for head Pod should be Never or unset when using SidecarMode"),
    # other RayJob fields
    ("runtime-env-not-yaml", TRAIN, {"spec.runtimeEnvYAML": "pip: [torch"}, "runtimeEnvYAML is not valid YAML"),
    ("runtime-env-not-a-mapping", TRAIN, {"spec.runtimeEnvYAML": "- pip\n- torch"}, "runtimeEnvYAML is not a YAML mapping"),
    ("active-deadline-zero", TRAIN, {"spec.activeDeadlineSeconds": 0}, "activeDeadlineSeconds must be a positive"),
    ("pre-running-deadline-zero", RESTORE, {"spec.preRunningDeadlineSeconds": 0}, "preRunningDeadlineSeconds must be a positive"),
    ("negative-backoff", TRAIN, {"spec.backoffLimit": -1}, "backoffLimit must be a positive integer"),
    # deletion strategy
    ("deletion-rules-with-shutdown", TRAIN, {"spec.shutdownAfterJobFinishes": True},
     "shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive"),
    ("deletion-rules-and-legacy", TRAIN, {"spec.deletionStrategy.onSuccess": {"policy": "DeleteSelf"}},
     "Cannot use both legacy onSuccess/onFailure fields and deletionRules"),
    ("empty-deletion-strategy", RESTORE, {"spec.deletionStrategy": {}},
     "DeletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules field"),
    ("rule-with-both-statuses", TRAIN, {f"{RULES}.0.condition.jobDeploymentStatus": "Failed"},
     "cannot set both JobStatus and JobDeploymentStatus"),
    ("rule-without-status", CRON, {f"{TEMPLATE}.deletionStrategy.deletionRules.0.condition": {"ttlSeconds": 5}},
     "exactly one of JobStatus and JobDeploymentStatus must be set"),
    ("rule-negative-ttl", TRAIN, {f"{RULES}.1.condition.ttlSeconds": -1}, "TTLSeconds must be non-negative"),
    ("delete-cluster-with-selector", RESTORE, {"spec.deletionStrategy": rules(("DeleteCluster", {"jobStatus": "FAILED"}))},
     "DeletionPolicyType 'DeleteCluster' not supported when ClusterSelector is set"),
    ("delete-workers-with-autoscaling", TRAIN,
     {**NO_TTL, f"{TRAIN_CLUSTER}.enableInTreeAutoscaling": True,
      "spec.deletionStrategy": rules(("DeleteWorkers", {"jobStatus": "FAILED"}))},
     "DeletionPolicyType 'DeleteWorkers' not supported with autoscaling enabled"),
    ("duplicate-rule", TRAIN, {f"{RULES}.3.condition.jobStatus": "SUCCEEDED"}, "duplicate rule"),
    ("rule-ttls-out-of-order", TRAIN,
     {**NO_TTL, "spec.deletionStrategy": rules(("DeleteCluster", {"jobStatus": "FAILED", "ttlSeconds": 600}),
                                               ("DeleteSelf", {"jobStatus": "FAILED", "ttlSeconds": 60}))},
     "TTLs must follow DeleteWorkers <= DeleteCluster <= DeleteSelf"),
    ("legacy-only-on-success", TRAIN, {"spec.deletionStrategy": {"onSuccess": {"policy": "DeleteCluster"}}},
     "both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set"),
    ("legacy-policy-unset", TRAIN, {"spec.deletionStrategy": {"onSuccess": {}, "onFailure": {"policy": "DeleteCluster"}}},
     "cannot be unset"),
    ("legacy-delete-cluster-with-selector", RESTORE,
     {"spec.deletionStrategy": {"onSuccess": {"policy": "DeleteCluster"}, "onFailure": {"policy": "DeleteSelf"}}},
     "the ClusterSelector mode doesn't support DeletionStrategy=DeleteCluster"),
    ("legacy-delete-workers-with-autoscaling", TRAIN,
     {f"{TRAIN_CLUSTER}.enableInTreeAutoscaling": True,
      "spec.deletionStrategy": {"onSuccess": {"policy": "DeleteWorkers"}, "onFailure": {"policy": "DeleteCluster"}}},
     "DeletionStrategy=DeleteWorkers currently does not support RayCluster with autoscaling enabled"),
    ("legacy-delete-none-with-shutdown", TRAIN,
     {"spec.shutdownAfterJobFinishes": True,
      "spec.deletionStrategy": {"onSuccess": {"policy": "DeleteNone"}, "onFailure": {"policy": "DeleteCluster"}}},
     "while deletion policy is 'DeleteNone'"),
    # the RayCronJob's own fields
    ("cron-schedule-with-tz", CRON, {"spec.schedule": "CRON_TZ=UTC 0 2 * * *"}, "cannot use TZ or CRON_TZ"),
    ("cron-schedule-six-fields", CRON, {"spec.schedule": "0 0 2 * * *"}, "invalid cron schedule"),
    ("cron-schedule-out-of-range", CRON, {"spec.schedule": "0 24 * * *"}, "invalid cron schedule"),
    ("cron-empty-time-zone", CRON, {"spec.timeZone": ""}, "timeZone must not be empty string"),
    ("cron-unknown-time-zone", CRON, {"spec.timeZone": "Mars/Olympus_Mons"}, "invalid time zone"),
    ("cron-template-without-cluster", CRON, {f"{TEMPLATE}.rayClusterSpec": DELETE},
     "invalid RayJob template: one of RayClusterSpec or ClusterSelector must be set"),
]


@pytest.mark.parametrize("case,target,changes,reason", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_the_operator_rules_reject_this_mutation(case, target, changes, reason):
    manifest = base(*target)
    assert operator_errors(manifest) == [], "the unmutated manifest passes"
    errors = operator_errors(edit(manifest, changes))
    assert any(reason in error for error in errors), f"{case}: expected '{reason}', got {errors}"


def test_the_operator_rule_helpers_parse_what_go_parses():
    assert [cron_schedule_error(s) for s in ("0 2 * * *", "*/15 0-6 1,15 JAN-MAR mon-fri", "@daily", "@every 1h30m")] == [None] * 4
    assert all(cron_schedule_error(s) for s in ("", "0 2 * *", "61 * * * *", "5-1 * * * *", "*/0 * * * *", "@sometimes"))
    assert generic_version("2.60.0") == (2, 60, 0) and generic_version("v2.52") == (2, 52)
    assert generic_version("2") is None and generic_version("2.06.0") is None and generic_version("latest") is None
    assert is_label_key("app.kubernetes.io/name") and not is_label_key("/name") and not is_label_key("a" * 64)
    assert is_label_value("") and is_label_value("resflow-flow") and not is_label_value("-x")


def test_the_operator_version_is_named_once_and_runs_the_gates_we_need():
    """README, the Helm values and the manifests agree on KubeRay 1.7.0 (the CRDs and validation.go
    this file checks against), the RayCronJob gate is on, and no older operator is named."""
    values = (K8S / "kuberay-operator-values.yaml").read_text()
    readme = (INFRA / "README.md").read_text()
    for name, text in (("kuberay-operator-values.yaml", values), ("README.md", readme)):
        versions = set(re.findall(r"kuberay-operator\S*\s+--version\s+(\S+)", text))
        assert versions == {KUBERAY_VERSION}, f"{name} installs KubeRay {versions}"
    gates = feature_gates()
    assert gates["RayCronJob"] and gates["RayJobDeletionPolicy"], "RayCronJob (alpha) and deletionRules need these"
    assert not any(gates.get(gate) for gate in GATED_OFF), "encode the rules behind a gate before turning it on"
    assert "RayCronJob" in readme and "featureGates" in readme
    infra_text = "\n".join(p.read_text() for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".md", ".yaml", ".sh"))
    assert not re.search(r"(?i)kuberay\S*\s+(?:--version\s+|>=\s*|v)?1\.[0-5]\.\d", infra_text), "an older KubeRay is named"


# ---------------------------------------------------------------------------------------------
# A secured cluster


def security_problems(where: str, template: dict) -> list[str]:
    pod = template["spec"]
    problems = []
    context = pod.get("securityContext") or {}
    expected_pod = {"runAsNonRoot": True, "runAsUser": RAY_UID, "seccompProfile": {"type": "RuntimeDefault"}}
    problems += [f"{where}: pod securityContext.{k} is {context.get(k)!r}" for k, v in expected_pod.items()
                 if context.get(k) != v]
    for container in containers_of(template):
        problems += container_security_problems(f"{where} container {container['name']}", container)
    return problems


def container_security_problems(where: str, container: dict) -> list[str]:
    context = container.get("securityContext") or {}
    # a read-only root: what a process writes goes to an emptyDir with a size limit
    expected = {"runAsNonRoot": True, "runAsUser": RAY_UID, "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    problems = [f"{where}: securityContext.{k} is {context.get(k)!r}" for k, v in expected.items() if context.get(k) != v]
    if context.get("privileged"):
        problems.append(f"{where}: privileged")
    resources = container.get("resources") or {}
    for kind in ("requests", "limits"):
        missing = {"cpu", "memory", "ephemeral-storage"} - set(resources.get(kind) or {})
        if missing:
            problems.append(f"{where}: no {kind} for {sorted(missing)}")
    gpu = [resources.get(kind, {}).get("nvidia.com/gpu") for kind in ("requests", "limits")]
    if any(gpu) and gpu[0] != gpu[1]:
        problems.append(f"{where}: GPU requests {gpu[0]} differ from limits {gpu[1]}")
    return problems


def every_pod(tmp_path) -> list[tuple[str, dict]]:
    pods = [(f"{render} {where}", template) for render, doc in all_rendered() for where, template in pod_templates(doc)]
    return pods + [(f"{overlay} flow-run Job", flow_run_job(overlay, tmp_path)["spec"]["template"]) for overlay in ("prod", "dev")]


def test_every_pod_and_container_runs_restricted_with_requests_and_limits(tmp_path):
    pods = every_pod(tmp_path)
    assert len(pods) >= 2 * (1 + 3 + 3 + 2 + 1), "worker, cluster (3), train (3), 2 submitters + cron, flow run"
    problems = [p for where, template in pods for p in security_problems(where, template)]
    for render, doc in all_rendered():
        for where, spec in cluster_specs(doc):
            if spec.get("enableInTreeAutoscaling"):  # the autoscaler is a container KubeRay adds to the head
                problems += container_security_problems(f"{render} {doc['metadata']['name']} autoscaler",
                                                        spec.get("autoscalerOptions") or {})
    assert problems == []


def test_every_pod_template_is_a_valid_pod_template(tmp_path):
    """Pod templates outside a CRD (the worker Deployment, the flow-run Job) against the API's
    PodTemplateSpec schema. prefect-kubernetes insists on `parallelism` and `completions` in the pod
    spec of its job template (its own default template has them there; the API server drops them)."""
    schema = pod_template_schema()
    for where, template in every_pod(tmp_path):
        errors = schema_errors(template, schema)
        if "flow-run Job" in where:
            errors = [e for e in errors if e not in (".spec.parallelism: unknown field", ".spec.completions: unknown field")]
        assert errors == [], where


def test_the_namespace_enforces_the_restricted_pod_security_standard():
    for overlay in ("prod", "dev"):
        namespace = one(rendered(f"{overlay}.yaml"), "Namespace")
        assert namespace["metadata"]["name"] == release(overlay)["namespace"]
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def submitted_cluster(render: str, job: dict) -> dict:
    """The RayClusterSpec a RayJob (or a RayCronJob's template) runs on: its own, or the one
    its clusterSelector names in the same overlay."""
    if job.get("rayClusterSpec"):
        return job["rayClusterSpec"]
    platform = render.replace("-jobs", "")
    return one(rendered(platform), "RayCluster", job["clusterSelector"]["ray.io/cluster"])["spec"]


def test_ray_clusters_use_token_auth_and_every_client_gets_the_token(tmp_path):
    ray_pin = ray_version()
    specs = [(render, doc, spec) for render, doc in kuberay_objects() for _, spec in cluster_specs(doc)]
    assert len(specs) == 6  # the long-running cluster, the training job's and the nightly one's, in prod and dev
    for render, doc, spec in specs:
        assert spec["authOptions"] == {"mode": "token", "secretName": "resflow-ray-token"}, render
        assert spec["rayVersion"] == ray_pin, f"{render}: rayVersion must be the image's Ray"
    for overlay in ("prod", "dev"):
        [flow] = flow_run_job(overlay, tmp_path)["spec"]["template"]["spec"]["containers"]
        env = env_of(flow)
        assert env.get("RAY_AUTH_MODE") == "token" and env.get("RAY_AUTH_TOKEN") == RAY_TOKEN, overlay


def test_submitters_get_the_token_from_kuberay_and_a_small_image():
    """KubeRay (>= 1.6) gives the submitter RAY_AUTH_MODE and RAY_AUTH_TOKEN from the cluster's
    authOptions (rayjob_controller.go, configureSubmitterContainer); a copy in the template repeats
    it and goes stale when the Secret is renamed. The submitter only runs `ray job submit`: the
    CPU image, not the multi-GB CUDA one."""
    submitters = [(render, doc, job) for render, doc in kuberay_objects() for job in job_specs(doc)]
    assert len(submitters) == 6
    for render, doc, job in submitters:
        where = f"{render} {object_id(doc)}"
        assert submitted_cluster(render, job)["authOptions"]["mode"] == "token", where
        [container] = job["submitterPodTemplate"]["spec"]["containers"]
        assert not [name for name in env_of(container) if name.startswith("RAY_AUTH")], f"{where}: KubeRay sets these"
        assert container["image"] == release(render.split("-")[0].split(".")[0])["images"]["resflow-cpu"], where


def test_s3_credentials_come_only_from_the_secret(tmp_path):
    """Ray pods (the Jobs API runs submitted code there) and flow runs read resflow-s3; the Prefect
    worker and the job submitters do not; nothing writes a credential and no Secret is rendered."""
    text = "\n".join((RENDERED / name).read_text() for name in RENDERS)
    assert not re.search(r"(?i)AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)", text)
    for render, doc in all_rendered():
        assert doc["kind"] != "Secret", f"{render}: Secrets are created with kubectl (infra/README.md), never rendered"
        for where, template in pod_templates(doc):
            for container in containers_of(template):
                has_s3 = S3_SECRET in container.get("envFrom", [])
                is_ray = container["name"] in ("ray-head", "ray-worker")
                assert has_s3 == is_ray, f"{render} {where} {container['name']}: resflow-s3 only in Ray pods"
    for overlay in ("prod", "dev"):
        [container] = flow_run_job(overlay, tmp_path)["spec"]["template"]["spec"]["containers"]
        assert S3_SECRET in container["envFrom"]


def pod_labels(template: dict, **extra) -> dict:
    return {**(template.get("metadata") or {}).get("labels", {}), **extra}


def admitted(policies: list[dict], target: dict, source: dict, source_namespace: str, port: int,
             namespace: str, namespace_labels: dict | None = None) -> bool:
    """Does Kubernetes let a pod with `source` labels reach `port` of a pod with `target` labels?"""
    namespace_labels = namespace_labels or {"kubernetes.io/metadata.name": source_namespace}

    def selects(selector: dict, labels: dict) -> bool:
        assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are evaluated here"
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    def peer_matches(peer: dict) -> bool:
        if "namespaceSelector" in peer:
            in_namespace = selects(peer["namespaceSelector"], namespace_labels)
        else:
            in_namespace = source_namespace == namespace
        return in_namespace and selects(peer.get("podSelector", {}), source)

    applying = [p for p in policies if selects(p["spec"]["podSelector"], target) and "Ingress" in p["spec"]["policyTypes"]]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if (not ports or port in ports) and any(peer_matches(peer) for peer in rule.get("from", [])):
                return True
    return False


@pytest.mark.parametrize("overlay", ["prod", "dev"])
def test_the_network_policy_admits_only_flow_runs_and_the_clusters_own_pods_to_the_head(overlay, tmp_path):
    docs, jobs = rendered(f"{overlay}.yaml"), rendered(f"{overlay}-jobs.yaml")
    namespace = release(overlay)["namespace"]
    policies = [d for d in docs + jobs if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")
               for p in policies), "a default deny for ingress in the namespace"

    ray_cluster = one(docs, "RayCluster")
    spec = ray_cluster["spec"]
    head = pod_labels(spec["headGroupSpec"]["template"], **{"ray.io/node-type": "head", "ray.io/cluster": "resflow"})
    workers = [pod_labels(g["template"], **{"ray.io/node-type": "worker"}) for g in spec["workerGroupSpecs"]]
    flow = pod_labels(flow_run_job(overlay, tmp_path)["spec"]["template"])
    assert flow.get(FLOW_LABEL[0]) == FLOW_LABEL[1], "the flow-run pods carry the label the policy admits"
    worker_pod = pod_labels(one(docs, "Deployment", "resflow-prefect-worker")["spec"]["template"])
    submitters = [pod_labels(t, **{"ray.io/originated-from-cr-name": d["metadata"]["name"]})
                  for d in jobs for where, t in pod_templates(d) if where.endswith("submitter")]
    operator = {"app.kubernetes.io/name": "kuberay-operator"}

    def reach(source, port, source_namespace=namespace):
        return admitted(policies, head, source, source_namespace, port, namespace)

    for port in (8265, 6379, 10001, 8080, 52365):  # Jobs API, GCS, Ray Client, metrics, dashboard agent
        assert all(reach(labels, port) for labels in workers + [head]), f"Ray pods reach the head on {port}"
        assert not reach({}, port) and not reach(worker_pod, port), f"other pods in the namespace on {port}"
        assert not reach(flow, port, "default") and not reach(operator, port, "default"), f"other namespaces on {port}"
    assert reach(flow, 8265) and all(reach(labels, 8265) for labels in submitters) and reach(operator, 8265, "kuberay")
    for port in (6379, 10001):  # flows go through the Jobs API only (flows/raybridge.py)
        assert not reach(flow, port) and not any(reach(labels, port) for labels in submitters)
        assert not reach(operator, port, "kuberay")
    for worker in workers:
        assert admitted(policies, worker, head, namespace, 10002, namespace) and not admitted(policies, worker, flow, namespace, 10002, namespace)

    train = one(jobs, "RayJob", "resflow-train")["spec"]
    train_head = pod_labels(train["rayClusterSpec"]["headGroupSpec"]["template"], **{"ray.io/node-type": "head"})
    train_submitter = pod_labels(train["submitterPodTemplate"], **{"ray.io/originated-from-cr-name": "resflow-train"})
    assert admitted(policies, train_head, train_submitter, namespace, 8265, namespace)
    assert not admitted(policies, train_head, flow, namespace, 6379, namespace)
    assert not admitted(policies, train_head, submitters[1], namespace, 8265, namespace), "only its own submitter"


@pytest.mark.parametrize("overlay", ["prod", "dev"])
def test_service_accounts_grant_only_what_each_pod_needs(overlay, tmp_path):
    docs = rendered(f"{overlay}.yaml") + rendered(f"{overlay}-jobs.yaml")
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs)
    bound = {s["name"] for b in bindings for s in b["subjects"] if s["kind"] == "ServiceAccount"}
    assert bound == {"resflow-prefect-worker"}

    worker = one(docs, "Deployment", "resflow-prefect-worker")["spec"]["template"]["spec"]
    assert worker["serviceAccountName"] == "resflow-prefect-worker"
    [binding] = bindings
    assert all(s.get("namespace") == release(overlay)["namespace"] for s in binding["subjects"])
    role = one(docs, "Role", binding["roleRef"]["name"])
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert {("batch", "jobs", v) for v in ("create", "get", "list", "watch")} <= granted
    assert {("", r, v) for r in ("pods", "pods/log") for v in ("get", "list", "watch")} <= granted
    assert not any("*" in item or resource == "secrets" for item in granted for resource in [item[1]])
    assert not any(verb in ("create", "update", "patch", "delete") for group, _, verb in granted if group == ""), \
        "the worker reads pods; it creates Jobs only"

    flow = flow_run_job(overlay, tmp_path)["spec"]["template"]["spec"]
    assert flow["serviceAccountName"] == "resflow-flow" and flow["automountServiceAccountToken"] is False
    for name in ("resflow-flow", "resflow-ray"):
        assert accounts[name]["automountServiceAccountToken"] is False
    for render_doc in docs:
        for where, template in pod_templates(render_doc):
            spec = template["spec"]
            if where.endswith("RayCluster/resflow spec head"):
                # KubeRay gives the head the account its in-tree autoscaler needs (it scales pods)
                assert "serviceAccountName" not in spec and render_doc["spec"]["enableInTreeAutoscaling"]
            elif "Deployment" not in where:
                assert spec["serviceAccountName"] == "resflow-ray" and spec["automountServiceAccountToken"] is False, where


# ---------------------------------------------------------------------------------------------
# One packaging: kustomize base + overlays, rendered and committed


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_the_committed_render_matches_a_fresh_render(name):
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed: the committed render is validated as it is")
    fresh = subprocess.run([*command, str(K8S / RENDERS[name])], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    committed = (RENDERED / name).read_text()
    assert committed.startswith("# Rendered by infra/k8s/render.sh"), "render with infra/k8s/render.sh"
    assert [d for d in yaml.safe_load_all(fresh.stdout) if d] == rendered(name), \
        f"infra/k8s/rendered/{name} is stale: run infra/k8s/render.sh and commit the result"


def test_namespace_and_images_are_written_once_per_overlay():
    for path in K8S.rglob("kustomization.yaml"):
        kustomization = yaml.safe_load(path.read_text())
        where = path.relative_to(K8S).parent.as_posix()
        if where.endswith("/release"):
            assert kustomization["kind"] == "Component" and {"namespace", "images"} <= set(kustomization)
        else:
            assert not {"namespace", "images"} & set(kustomization), f"{where}: only the release component sets these"
    for path in list((K8S / "base").iterdir()) + list((K8S / "jobs").iterdir()):
        text = path.read_text()
        assert "ghcr.io" not in text and not re.search(r"^\s*namespace:", text, flags=re.M), path.name
    for overlay in ("prod", "dev"):
        wanted = release(overlay)
        for name in (f"{overlay}.yaml", f"{overlay}-jobs.yaml"):
            for doc in rendered(name):
                if doc["kind"] not in ("Namespace",):
                    assert doc["metadata"].get("namespace") == wanted["namespace"], f"{name} {object_id(doc)}"
                for where, template in pod_templates(doc):
                    for container in containers_of(template):
                        if doc["kind"] == "Deployment":
                            role = "resflow-worker"  # the Prefect image
                        elif where.endswith("submitter") or where.endswith("group cpu"):
                            role = "resflow-cpu"  # the Ray image's CPU build
                        else:
                            role = "resflow"  # Ray heads and GPU workers
                        assert container["image"] == wanted["images"][role], f"{name} {where}"
        worker = one(rendered(f"{overlay}.yaml"), "Deployment")
        assert env_of(worker["spec"]["template"]["spec"]["containers"][0])["RESFLOW_FLOW_IMAGE"] == wanted["images"]["resflow-worker"]
        for image in wanted["images"].values():
            tag = image.rpartition(":")[2]
            assert tag in (PROJECT["version"], PROJECT["version"] + "-cpu"), "images are tagged with the project version"


def test_every_entrypoint_is_a_valid_resflow_command():
    try:
        from pipeline.cli import build_parser
    except ImportError as error:
        pytest.fail(f"the KubeRay entrypoints run `python -m pipeline.cli`; it no longer imports ({error}): "
                    "update infra/k8s/jobs/*.yaml and this test together")
    parser = build_parser()
    found = [(object_id(doc), job["entrypoint"]) for _, doc in kuberay_objects() for job in job_specs(doc)]
    assert len(found) == 6
    for name, entry in found:
        argv = shlex.split(entry)
        assert argv[:3] == ["python", "-m", "pipeline.cli"], f"{name}: {entry}"
        try:
            parser.parse_args(argv[3:])
        except SystemExit as error:
            raise AssertionError(f"{name}: `{entry}` is not a valid resflow command") from error


# ---------------------------------------------------------------------------------------------
# The images and their locks


def ray_version() -> str:
    return next(dep for dep in PROJECT["dependencies"] if dep.startswith("ray[")).split("==")[1]


def torch_version() -> str:
    return (REPO / "constraints-cpu.txt").read_text().split("torch==")[1].split()[0]


def lock_pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile/uv lock with --generate-hashes."""
    pins = {}
    for block in re.split(r"\n(?=\S)", path.read_text()):
        match = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", block)
        if match:
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = (match[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def dependency_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement)[0]).lower()


LOCKS = {"Dockerfile": "requirements-gpu.lock", "Dockerfile.worker": "requirements-worker.lock"}


@pytest.mark.parametrize("dockerfile,lock", LOCKS.items())
def test_the_image_lock_pins_the_projects_ray_and_torch_with_hashes(dockerfile, lock):
    pins = lock_pins(DOCKER / lock)
    assert pins["ray"][0] == ray_version()
    assert pins["torch"][0].split("+")[0] == torch_version()
    assert not [name for name in pins if name.startswith("seaweedfs")], "the local S3 server stays out of images"
    assert [name for name, (_, hashes) in pins.items() if not hashes] == [], "every pin has its hashes"
    missing = {dependency_name(d) for d in PROJECT["dependencies"]} - set(pins)
    assert not missing, f"{lock} lacks the project's dependencies {missing}: rerun infra/docker/lock.sh"
    assert "setuptools" in pins, "the project is built with --no-build-isolation from the lock's setuptools"
    if lock == "requirements-worker.lock":
        assert "prefect-kubernetes" in pins and pins["torch"][0].endswith("+cpu")
        assert not [name for name in pins if name.startswith("nvidia-")], "no CUDA in the Prefect image"
    else:
        assert "+" not in pins["torch"][0], "the Ray image's torch is PyPI's CUDA build"


@pytest.mark.parametrize("dockerfile,lock", LOCKS.items())
def test_the_dockerfile_installs_only_from_its_lock(dockerfile, lock):
    text = (DOCKER / dockerfile).read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S*)", text, flags=re.M))  # what a build without --build-arg gets
    text = re.sub(r"\$\{(\w+)\}", lambda name: defaults.get(name[1], name[0]), text)
    [base] = re.findall(r"^FROM (\S+)", text, flags=re.M)
    if dockerfile == "Dockerfile":
        assert base == f"rayproject/ray:{ray_version()}-py311-gpu"
    else:
        assert base.startswith("python:3.11-slim")
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) (\S+)$", text, flags=re.M)
    for sources, _ in copies:
        for item in sources.split():
            assert (REPO / item).exists(), f"{dockerfile} copies {item}, which does not exist"
    [target] = [target for sources, target in copies if sources == f"infra/docker/{lock}"]
    installs = re.findall(r"pip install ([^\n&]+)", re.sub(r"\\\n\s*", " ", text))
    assert len(installs) == 2, installs
    assert "--require-hashes" in installs[0] and f"-r {target}" in installs[0]
    assert "--no-deps" in installs[1] and installs[1].split()[-1] == ".", "then the project alone"
    assert not re.search(r"^ENV .*AWS_", text, flags=re.M)
    user = re.findall(r"^USER (\S+)", text, flags=re.M)[-1]
    assert user in ("ray", f"{RAY_UID}:100"), "the image runs as uid 1000, as the securityContext says"


def test_the_launcher_yaml_passes_rays_schema_and_turns_token_auth_on():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "aws/cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own schema, after the launcher's defaults
    assert config["provider"]["type"] == "aws" and config["docker"]["image"] == release("prod")["images"]["resflow"]
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all("InstanceType" in t["node_config"] and "IamInstanceProfile" in t["node_config"] for t in gpu)
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    options = " ".join(config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", options)[1]
    assert token_path in config["file_mounts"], "the token file is copied to every node"
    assert "aws_secret" not in json.dumps(config).lower()


# ---------------------------------------------------------------------------------------------
# The Prefect work pool


@pytest.mark.parametrize("overlay", ["prod", "dev"])
def test_the_work_pool_worker_and_its_flow_run_jobs_fit_the_cluster(overlay, tmp_path):
    docs = rendered(f"{overlay}.yaml")
    worker = one(docs, "Deployment", "resflow-prefect-worker")
    [container] = worker["spec"]["template"]["spec"]["containers"]
    assert "--pool" not in container["command"], "the pool is the overlay's RESFLOW_WORK_POOL"
    assert (K8S / "base/start_worker.py").read_text() == configmap_file(docs, "resflow-prefect-worker", "start_worker.py")
    [settings] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("resflow-settings-")]
    assert settings["data"]["PREFECT_API_URL"].endswith("/api")
    assert settings["data"]["RESFLOW_WORK_POOL"] == WORK_POOLS[overlay]
    assert {"configMapRef": {"name": settings["metadata"]["name"]}} in container["envFrom"]
    assert "resflow-s3" not in json.dumps(worker) and "RAY_AUTH_TOKEN" not in json.dumps(worker), \
        "the worker starts Jobs; it needs neither S3 nor the Ray token"

    job = flow_run_job(overlay, tmp_path)
    pod = job["spec"]["template"]
    [flow] = pod["spec"]["containers"]
    assert job["metadata"]["namespace"] == release(overlay)["namespace"]
    assert flow["image"] == release(overlay)["images"]["resflow-worker"]
    assert pod["spec"]["serviceAccountName"] == "resflow-flow" and pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["labels"][FLOW_LABEL[0]] == FLOW_LABEL[1]
    assert security_problems("flow run", pod) == []
    env = env_of(flow)
    ray_cluster = one(docs, "RayCluster")["metadata"]["name"]
    assert env["RAY_ADDRESS"] == f"http://{ray_cluster}-head-svc:8265", "the cluster's Jobs API (KubeRay's head service)"
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == RAY_TOKEN
    assert flow["envFrom"] == [S3_SECRET]


def test_the_readme_uses_the_current_layout_and_commands():
    readme = (INFRA / "README.md").read_text()
    for path in re.findall(r"`(infra/[^`\s]+)`", readme):
        for overlay in ("prod", "dev"):
            assert (REPO / path.replace("<env>", overlay).rstrip("/")).exists(), f"README names {path}, which does not exist"
    assert "kubectl apply -k infra/k8s/overlays/prod" in readme
    assert f"resflow deploy --work-pool {WORK_POOL} --source /app --gpu" in readme
    assert "infra/kuberay" not in readme and "infra/prefect" not in readme and "prefect.yaml" not in readme
    assert "resflow-ray-token" in readme and "resflow-s3" in readme



# ---------------------------------------------------------------------------------------------
# Memory and disk of the Ray pods

QUANTITY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                  "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> int:
    """A Kubernetes resource quantity in bytes (or units): 16Gi, 512Mi, 2147483648."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return int(float(number) * QUANTITY_UNITS[unit])


def ray_nodes(render: str, doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, rayStartParams, pod template) of every Ray node group in a KubeRay object."""
    nodes = []
    for where, spec in cluster_specs(doc):
        name = f"{render} {object_id(doc)} {where}"
        nodes.append((f"{name} head", spec["headGroupSpec"].get("rayStartParams") or {},
                      spec["headGroupSpec"]["template"]))
        nodes += [(f"{name} group {group['groupName']}", group.get("rayStartParams") or {}, group["template"])
                  for group in spec.get("workerGroupSpecs", [])]
    return nodes


def volume_at(template: dict, container: dict, path: str) -> dict | None:
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    return volumes.get(mounts.get(path))


def test_every_ray_node_sizes_its_object_store_and_dev_shm_together():
    """Without object-store-memory Ray takes 30% of the memory limit for the object store, and
    when /dev/shm is smaller it falls back to disk (CPU workers had a 4Gi /dev/shm under a 16Gi
    limit; the heads had none). /dev/shm (a memory emptyDir) counts against the memory limit."""
    nodes = [node for render, doc in kuberay_objects() for node in ray_nodes(render, doc)]
    for where, params, template in nodes:
        [container] = template["spec"]["containers"]
        assert "object-store-memory" in params, f"{where}: Ray would take 30% of the memory limit"
        store = int(params["object-store-memory"])
        memory = quantity(container["resources"]["limits"]["memory"])
        shm = volume_at(template, container, "/dev/shm")
        assert shm and shm["emptyDir"].get("medium") == "Memory", f"{where}: no memory-backed /dev/shm"
        shm_size = quantity(shm["emptyDir"]["sizeLimit"])
        assert store < shm_size, f"{where}: the object store ({store}) does not fit in /dev/shm ({shm_size})"
        assert store <= 0.3 * memory and shm_size <= memory / 2, f"{where}: leave memory for the processes"
    assert len(nodes) == 2 * (3 + 2 + 2)  # cluster (head, gpu, cpu), train and nightly (head, gpu), prod and dev


def test_the_launcher_sizes_the_object_store_inside_its_shm():
    config = yaml.safe_load((INFRA / "aws/cluster.yaml").read_text())
    [shm] = [quantity(o.split("=")[1].replace("g", "Gi")) for o in config["docker"]["run_options"] if "--shm-size" in o]
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        [start] = [c for c in commands if c.startswith("ray start")]
        found = re.search(r"--object-store-memory=(\d+)", start)
        assert found and int(found[1]) < shm, f"`{start}` must set an object store smaller than --shm-size"


def test_every_pod_writes_only_to_emptydirs_within_its_ephemeral_storage_limit(tmp_path):
    """Root filesystems are read-only (the restricted test checks every container); what is
    written goes to emptyDirs with size limits, whose sum the pod's ephemeral-storage limit
    covers. Ray gets /tmp/ray (sessions, logs, spilled objects) and /tmp (Python's temp files,
    the training checkpoints) of its own; on the autoscaling head the /tmp/ray volume is
    `ray-logs`, the one KubeRay's autoscaler sidecar shares (pod.go, addEmptyDir)."""
    pods = every_pod(tmp_path)
    for where, template in pods:
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        disk = 0
        for name, volume in volumes.items():
            if "emptyDir" in volume:
                assert "sizeLimit" in volume["emptyDir"], f"{where}: emptyDir {name} without a sizeLimit"
                if volume["emptyDir"].get("medium") != "Memory":
                    disk += quantity(volume["emptyDir"]["sizeLimit"])
        limits = [c["resources"]["limits"].get("ephemeral-storage") for c in containers_of(template)]
        assert all(limits), f"{where}: a container without an ephemeral-storage limit"
        limit = sum(quantity(value) for value in limits)
        assert disk <= limit, f"{where}: emptyDirs may hold {disk} bytes, the containers' limit is {limit}"
        for container in containers_of(template):
            assert volume_at(template, container, "/tmp"), f"{where} {container['name']}: no writable /tmp"
            if container["name"] in ("ray-head", "ray-worker"):
                assert volume_at(template, container, "/tmp/ray"), f"{where}: /tmp/ray is not an emptyDir"
    for render, doc in all_rendered():
        for where, spec in cluster_specs(doc):
            if spec.get("enableInTreeAutoscaling"):
                head = spec["headGroupSpec"]["template"]
                assert volume_at(head, head_container(spec), "/tmp/ray")["name"] == "ray-logs", render
                names = {v["name"] for v in head["spec"]["volumes"]}
                mounts = spec["autoscalerOptions"].get("volumeMounts", [])
                assert {"/tmp"} == {m["mountPath"] for m in mounts} and {m["name"] for m in mounts} <= names, render


# ---------------------------------------------------------------------------------------------
# Egress

INSTANCE_METADATA = ("169.254.169.254", "fd00:ec2::254")  # AWS/GCP/Azure IMDS; EC2's IPv6 IMDS


def egress_allowed(policies: list[dict], source: dict, address: str) -> bool:
    """Does Kubernetes let a pod with `source` labels open a connection to `address` (outside
    the cluster's pods)? No egress policy selecting the pod: everything is allowed."""
    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    def in_block(block: dict) -> bool:
        ip = ipaddress.ip_address(address)
        network = ipaddress.ip_network(block["cidr"])
        return (ip.version == network.version and ip in network
                and not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])))

    applying = [p for p in policies if selects(p["spec"]["podSelector"], source) and "Egress" in p["spec"]["policyTypes"]]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get("egress", []):
            if "to" not in rule or any("ipBlock" in peer and in_block(peer["ipBlock"]) for peer in rule["to"]):
                return True
    return False


@pytest.mark.parametrize("overlay", ["prod", "dev"])
def test_no_pod_reaches_the_instance_metadata_address(overlay, tmp_path):
    """The metadata address hands out the node's cloud credentials; S3 and everything else on
    the internet stay reachable, and so do pods in every namespace (DNS, the Prefect server)."""
    docs = rendered(f"{overlay}.yaml") + rendered(f"{overlay}-jobs.yaml")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = [pod_labels(template) for _, template in every_pod(tmp_path)] + [{}]
    for labels in pods:
        for address in INSTANCE_METADATA:
            assert not egress_allowed(policies, labels, address), f"a pod {labels} reaches {address}"
        for address in ("52.216.0.1", "8.8.8.8", "169.254.170.23", "2600:1f18::1"):  # S3, DNS, EKS Pod Identity
            assert egress_allowed(policies, labels, address), f"a pod {labels} cannot reach {address}"
        egress = [p for p in policies if "Egress" in p["spec"]["policyTypes"]]
        assert any({"namespaceSelector": {}} in rule.get("to", []) for p in egress for rule in p["spec"]["egress"])


def test_the_cilium_addition_admits_the_api_server_to_the_pods_that_call_it():
    """On Cilium the egress ipBlocks do not cover an API server on the cluster's nodes: the
    optional CiliumNetworkPolicy admits it for exactly the Prefect worker and the autoscaling head."""
    [policy] = documents(K8S / "cilium-kube-apiserver.yaml")
    docs = rendered("prod.yaml")
    worker = pod_labels(one(docs, "Deployment", "resflow-prefect-worker")["spec"]["template"])
    cluster = one(docs, "RayCluster", "resflow")["spec"]
    head = pod_labels(cluster["headGroupSpec"]["template"], **{"ray.io/node-type": "head"})
    workers = [pod_labels(g["template"], **{"ray.io/node-type": "worker"}) for g in cluster["workerGroupSpecs"]]
    flow = {FLOW_LABEL[0]: FLOW_LABEL[1]}

    def admitted_to_api_server(labels: dict) -> bool:
        return any(all(labels.get(k) == v for k, v in spec["endpointSelector"]["matchLabels"].items())
                   and {"toEntities": ["kube-apiserver"]} in spec["egress"] for spec in policy["specs"])

    assert admitted_to_api_server(worker) and admitted_to_api_server(head) and cluster["enableInTreeAutoscaling"]
    assert not any(admitted_to_api_server(labels) for labels in workers + [flow])


# ---------------------------------------------------------------------------------------------
# Ray jobs: GPUs given back, deadlines that stop a job, replicas that match the GPUs


TERMINAL = [("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")]


def deletion_ttls(job: dict) -> dict[tuple[str, str], dict[str, int]]:
    """{(condition, status): {policy: ttlSeconds}} of a RayJob's deletionRules."""
    ttls: dict = {}
    for rule in (job.get("deletionStrategy") or {}).get("deletionRules", []):
        [(key, status)] = [(k, v) for k, v in rule["condition"].items() if k != "ttlSeconds"]
        ttls.setdefault((key, status), {})[rule["policy"]] = rule["condition"].get("ttlSeconds", 0)
    return ttls


def test_a_job_with_its_own_cluster_gives_its_gpus_back_when_it_ends():
    """The training job kept its 4 GPU workers an hour after it ended (ttlSecondsAfterFinished:
    3600 deletes the whole cluster at once, workers included): each job with a cluster of its
    own deletes the workers when it ends, then the cluster, then itself."""
    jobs = [(f"{render} {object_id(doc)}", job) for render, doc in kuberay_objects() for job in job_specs(doc)
            if job.get("rayClusterSpec")]
    for where, job in jobs:
        assert not job.get("shutdownAfterJobFinishes") and not job.get("ttlSecondsAfterFinished"), \
            f"{where}: the whole cluster, GPU workers included, stays until the TTL"
        ttls = deletion_ttls(job)
        for status in TERMINAL:
            assert ttls.get(status, {}).get("DeleteWorkers") == 0, f"{where}: GPU workers stay after {status}"
            assert "DeleteCluster" in ttls[status] and "DeleteSelf" in ttls[status], f"{where}: {status}"
    assert len(jobs) == 4  # train and the nightly restore, prod and dev


def cron_minutes(schedule: str, days: int = 8) -> list[int]:
    """The minutes (from a Monday 00:00) at which a five-field cron schedule fires, for `days`."""
    def values(field: str, low: int, high: int, names: dict) -> set[int]:
        found = set()
        for item in field.split(","):
            span, _, step = item.partition("/")
            if span in ("*", "?"):
                start, end = low, high
            else:
                first, _, last = span.partition("-")
                start = int(names.get(first.lower(), first))
                end = int(names.get(last.lower(), last)) if last else (high if step else start)
            found |= set(range(start, end + 1, int(step or 1)))
        return found

    fields = schedule.split()
    minute, hour, dom, month, dow = (values(f, *spec) for f, spec in zip(fields, CRON_FIELDS))
    fired = []
    for day in range(days):
        weekday = (day + 1) % 7  # cron: 0 is Sunday; day 0 is a Monday
        date = 5 + day  # 2026-01-05 is a Monday
        day_matches = ((date in dom or weekday in dow) if fields[2] != "*" and fields[4] != "*"
                       else (date in dom and weekday in dow))
        if day_matches and 1 in month:
            fired += [day * 1440 + h * 60 + m for h in sorted(hour) for m in sorted(minute)]
    return fired


def test_the_nightly_restore_uses_every_gpu_and_ends_before_the_next_night():
    """Without --workers restore plans one replica per GPU it sees, and the GPU group sits at
    zero between nights; without a deadline a slow night runs into the next. KubeRay 1.7 acts on
    a clusterSelector RayJob's deadline by marking it Failed only (the Ray job runs on), so the
    nightly job brings its own cluster and deletes it at the deadline."""
    for render, doc in kuberay_objects():
        if doc["kind"] != "RayCronJob":
            continue
        job = doc["spec"]["jobTemplate"]
        fired = cron_minutes(doc["spec"]["schedule"])
        interval = 60 * min(b - a for a, b in zip(fired, fired[1:]))
        assert 0 < job.get("activeDeadlineSeconds", 0) < interval, f"{render}: a night must end before the next ({interval} s)"
        assert not job.get("clusterSelector") and job.get("rayClusterSpec"), f"{render}: a deadline KubeRay enforces"
        assert deletion_ttls(job)[("jobDeploymentStatus", "Failed")]["DeleteCluster"] == 0, \
            f"{render}: at the deadline the cluster, and the job with it, must go at once"
    assert cron_minutes("0 2 * * *")[:2] == [120, 1560] and cron_minutes("*/30 * * * 1-5")[:2] == [0, 30]


def test_restore_jobs_ask_for_the_replicas_their_cluster_can_hold():
    for render, doc in kuberay_objects():
        for job in job_specs(doc):
            argv = shlex.split(job["entrypoint"])
            if argv[3] != "restore":
                continue
            where = f"{render} {object_id(doc)}"
            assert "--workers" in argv, f"{where}: restore would plan for the GPUs it sees at start (none)"
            workers = int(argv[argv.index("--workers") + 1])
            [gpu] = [g for g in submitted_cluster(render, job)["workerGroupSpecs"] if g["groupName"] == "gpu"]
            assert 1 <= workers <= gpu["maxReplicas"], f"{where}: {workers} replicas, at most {gpu['maxReplicas']} GPUs"
            if job.get("rayClusterSpec"):
                assert workers == gpu["replicas"] == gpu["minReplicas"], f"{where}: one replica per GPU worker"


def test_cluster_selector_jobs_carry_no_rules_the_operator_ignores():
    """KubeRay 1.7 returns before any deletion for a RayJob that uses an existing cluster
    (rayjob_controller.go: "skipping resource deletion"), and its deadline only marks it Failed:
    deletionRules or a deadline there would promise what never happens."""
    for render, doc in kuberay_objects():
        for job in job_specs(doc):
            if job.get("clusterSelector"):
                assert "deletionStrategy" not in job and "activeDeadlineSeconds" not in job, f"{render} {object_id(doc)}"


# ---------------------------------------------------------------------------------------------
# The Prefect side: who may change a flow-run pod, the crash observer, API auth, installations

HOSTILE_JOB_VARIABLES = {
    "image": "attacker/image:latest", "namespace": "kube-system", "service_account_name": "default",
    "labels": {"resflow.io/ray-cluster": "resflow", "app.kubernetes.io/component": "ray"},
    "annotations": {"sidecar.istio.io/inject": "false"},
    "env": {"RAY_ADDRESS": "http://attacker:8265", "AWS_ENDPOINT_URL": "http://attacker"},
    "env.PREFECT_API_URL": "http://attacker/api",
}


@pytest.mark.parametrize("overlay", ["prod", "dev"])
def test_a_deployment_cannot_change_what_a_flow_run_pod_is(overlay, tmp_path):
    """Whoever may write to the Prefect API sets a deployment's job variables. The flow-run pod
    always holds the Ray token and the S3 keys, and its label lifts the NetworkPolicy, so its
    image, namespace, service account, labels, annotations and environment are written into the
    Job, not offered as variables: the same job variables leave the Job as it is."""
    plain = flow_run_configuration(overlay, tmp_path)
    hostile = flow_run_configuration(overlay, tmp_path, HOSTILE_JOB_VARIABLES)
    assert hostile.job_manifest == plain.job_manifest
    # what prefect-kubernetes would merge into the Job's and the pod's labels and env
    assert hostile.labels == plain.labels == {} and hostile.env == plain.env == {}
    assert hostile.namespace == plain.namespace == release(overlay)["namespace"]
    pod = plain.job_manifest["spec"]["template"]
    assert pod["spec"]["containers"][0]["image"] == release(overlay)["images"]["resflow-worker"]
    assert pod["spec"]["serviceAccountName"] == "resflow-flow"
    assert plain.job_manifest["metadata"]["namespace"] == release(overlay)["namespace"]
    changed = flow_run_job(overlay, tmp_path, {"cpu_limit": "3", "memory_limit": "12Gi"})
    assert changed["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "12Gi", \
        "a deployment still sizes its pod"


def worker_container(overlay: str) -> dict:
    [container] = one(rendered(f"{overlay}.yaml"), "Deployment", "resflow-prefect-worker")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("overlay", ["prod", "dev"])
def test_the_crash_observer_watches_the_workers_own_namespace(overlay):
    """prefect-kubernetes 0.8's observer (it marks a run Crashed when its pod dies before Prefect
    starts, and so fires the failure alert) watches the whole cluster unless
    PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES is set; the worker's Role is namespaced."""
    env = env_of(worker_container(overlay))
    assert env.get("PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES") == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    docs = rendered(f"{overlay}.yaml")
    role = one(docs, "Role", "resflow-prefect-worker")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("", "pods", v) for v in ("list", "watch")} | {("batch", "jobs", v) for v in ("list", "watch")} <= granted


PREFECT_AUTH = {"secretKeyRef": {"name": "resflow-prefect-auth", "key": "auth-string"}}


@pytest.mark.parametrize("overlay", ["prod", "dev"])
def test_the_prefect_api_auth_string_comes_only_from_its_secret(overlay, tmp_path):
    """The Prefect server asks for PREFECT_SERVER_API_AUTH_STRING; its clients send
    PREFECT_API_AUTH_STRING. The worker reads it from the Secret and hands it to flow-run Jobs
    as a reference to that Secret (prefect-kubernetes' API_AUTH_STRING_SECRET_NAME/KEY),
    never as a value written into the Job."""
    env = env_of(worker_container(overlay))
    assert env.get("PREFECT_API_AUTH_STRING") == PREFECT_AUTH
    assert env.get("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME") == PREFECT_AUTH["secretKeyRef"]["name"]
    assert env.get("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY") == PREFECT_AUTH["secretKeyRef"]["key"]
    [flow] = flow_run_job(overlay, tmp_path)["spec"]["template"]["spec"]["containers"]
    assert "PREFECT_API_AUTH_STRING" not in env_of(flow), "the worker adds it, as a Secret reference"
    shapes = {d["metadata"]["name"]: d for d in documents(K8S / "secrets.example.yaml")}
    assert PREFECT_AUTH["secretKeyRef"]["key"] in shapes[PREFECT_AUTH["secretKeyRef"]["name"]]["stringData"]
    readme = (INFRA / "README.md").read_text()
    assert "PREFECT_SERVER_API_AUTH_STRING" in readme and "basicAuth.existingSecret=resflow-prefect-auth" in readme


def install_steps() -> dict[int, str]:
    """The numbered steps of infra/README.md's "From nothing to a nightly run" block."""
    readme = (INFRA / "README.md").read_text()
    section = readme.split("## From nothing to a nightly run", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[:1]
    parts = re.split(r"^# (\d+)\. ", block, flags=re.M)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2])}


def test_the_overlays_have_their_own_work_pool_and_deployments():
    """dev and prod talk to one Prefect server: with one pool and one set of deployment names,
    registering dev replaced prod's nightly deployment and its alerts."""
    from flows import deploy

    pools = {}
    for overlay in ("prod", "dev"):
        [settings] = [d for d in rendered(f"{overlay}.yaml") if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"].startswith("resflow-settings-")]
        pools[overlay] = settings["data"]["RESFLOW_WORK_POOL"]
    assert pools == WORK_POOLS
    steps = "\n".join(install_steps().values())
    readme = (INFRA / "README.md").read_text()
    assert f"resflow deploy --work-pool {pools['prod']} --source /app --gpu" in steps
    assert f"resflow deploy --work-pool {pools['dev']} --name-suffix dev --source /app --gpu" in readme
    assert deploy.deployment_name("nightly", "dev") != deploy.deployment_name("nightly")
    assert set(deploy.alert_names("dev")[1]).isdisjoint(deploy.alert_names()[1])
    assert deploy.alert_names("dev")[0] != deploy.alert_names()[0]


def test_the_install_steps_set_up_alerts_and_say_how_to_check_each_step():
    steps = install_steps()
    assert sorted(steps) == list(range(1, len(steps) + 1)) and len(steps) >= 6
    for number, text in steps.items():
        assert re.search(r"^# check: ", text, flags=re.M), f"step {number} does not say how to check it worked"
    everything = "\n".join(steps.values())
    assert "--notify-url" in everything, "the failure alerts are part of the install"
    assert "resflow-prefect-auth" in everything and "bucket-lifecycle.json" in everything


# ---------------------------------------------------------------------------------------------
# Object storage


def test_the_bucket_lifecycle_aborts_incomplete_multipart_uploads():
    """A writer killed mid-upload leaves its multipart upload open (and billed) forever unless a
    lifecycle rule aborts it; the rule is checked against S3's own API model (botocore)."""
    import botocore.session
    from botocore.validate import ParamValidator

    rules = json.loads((INFRA / "aws/bucket-lifecycle.json").read_text())
    model = botocore.session.get_session().get_service_model("s3")
    shape = model.operation_model("PutBucketLifecycleConfiguration").input_shape
    report = ParamValidator().validate({"Bucket": "resflow", "LifecycleConfiguration": rules}, shape)
    assert not report.has_errors(), report.generate_report()
    aborting = [rule for rule in rules["Rules"] if rule["Status"] == "Enabled" and "AbortIncompleteMultipartUpload" in rule]
    assert aborting and all(rule["Filter"] == {"Prefix": ""} for rule in aborting), "the whole bucket"
    assert 1 <= aborting[0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] <= 7
    readme = (INFRA / "README.md").read_text()
    assert "put-bucket-lifecycle-configuration" in readme and "MinIO" in readme
