"""What can be checked here of the cluster definitions in infra/ (no Docker, no Kubernetes, no
cloud): every YAML parses; the Ray cluster launcher config passes Ray's own schema; the KubeRay
manifests carry the fields the ray.io/v1 CRDs require; the RayJob's entrypoint is a valid
``jobs.separate`` command line; the image installs what infra/dev/install.sh installs, with the
same pins; the ``uss bulk-separate`` command dispatches to the job.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"


def load_all(path: Path) -> list[dict]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def test_every_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {p.relative_to(INFRA).as_posix() for p in files} >= {
        "ray/cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-bulk-separate.yaml",
        "mlflow/kubernetes.yaml",
    }
    for path in files:
        docs = load_all(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


# --------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_cluster_launcher_config_passes_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = load_all(INFRA / "ray" / "cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # as written, before the launcher fills in defaults
    validate_config(prepare_config(config))  # and as `ray up` would use it (no cloud calls)
    types = config["available_node_types"]
    assert any(t["resources"].get("GPU") for t in types.values()), "a GPU worker type"
    assert any(n != config["head_node_type"] and not t["resources"].get("GPU") for n, t in types.items())
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]
    assert "uss-at-scale" in config["docker"]["image"]


# --------------------------------------------------------------------------------------------
# KubeRay


def check_containers(pod_template: dict, where: str) -> list[dict]:
    """A pod template's containers: each has a name, an image and CPU/memory requests."""
    containers = pod_template["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert c["name"] and "uss-at-scale" in c["image"], where
        requests = c["resources"]["requests"]
        assert "cpu" in requests and "memory" in requests, where
        # Ray sizes a node from its limits: equal requests and limits keep the pod's share fixed.
        assert c["resources"]["limits"]["cpu"] == requests["cpu"], where
    return containers


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """The fields of a ray.io/v1 RayClusterSpec that the operator needs."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    # rayStartParams values are strings in the CRD (map[string]string).
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), where
    (head_container,) = check_containers(head["template"], f"{where} head")
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}, where
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups), where
    for g in groups:
        here = f"{where} worker group {g['groupName']}"
        assert isinstance(g["rayStartParams"], dict), here
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), here
        assert isinstance(g["replicas"], int) and g.get("minReplicas", 0) <= g["replicas"] <= g["maxReplicas"], here
        check_containers(g["template"], here)
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"])


def test_raycluster_manifest():
    (doc,) = load_all(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"], "RayCluster")
    gpu = [g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu and gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


def test_rayjob_manifest_runs_the_bulk_job():
    from jobs.separate import build_parser, config_from_args

    (doc,) = load_all(KUBERAY / "rayjob-bulk-separate.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)

    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.separate"]
    config = config_from_args(build_parser().parse_args(argv[3:]))  # the job's own parser and checks
    assert config.input.startswith("s3://") and config.output.startswith("s3://")
    # The actor pool fits the worker group it runs on.
    cpus = sum(
        g["replicas"] * float(g["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert config.actors * config.cpus_per_actor <= cpus
    gib = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"].removesuffix("Gi"))
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert config.memory_per_actor_gb is not None and config.actors * config.memory_per_actor_gb <= gib
    assert config.torch_threads <= config.cpus_per_actor


def test_mlflow_manifest_runs_the_server_script():
    docs = {d["kind"]: d for d in load_all(INFRA / "mlflow" / "kubernetes.yaml")}
    assert {"Deployment", "Service"} <= set(docs)
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1] == "/app/infra/mlflow/server.sh"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    # The URI the Ray jobs are given names this service.
    (ray_doc,) = load_all(KUBERAY / "raycluster.yaml")
    ray_env = {e["name"]: e["value"] for e in ray_doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    service = docs["Service"]["metadata"]
    port = docs["Service"]["spec"]["ports"][0]["port"]
    assert ray_env["MLFLOW_TRACKING_URI"] == f"http://{service['name']}.{service['namespace']}.svc.cluster.local:{port}"
    assert os.access(INFRA / "mlflow" / "server.sh", os.X_OK)


# --------------------------------------------------------------------------------------------
# The image


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` in a shell script or Dockerfile (continuations
    joined, variables left as written)."""
    text = re.sub(r"\\\n", " ", text)
    commands = []
    for line in text.splitlines():
        line = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        for part in re.split(r"&&|;", line):
            words = shlex.split(part)
            # `pip`, `python -m pip`, or install.sh's `$PIP` (= .venv/bin/python -m pip).
            is_pip = any(w in ("pip", "pip3", "$PIP", "${PIP}") for w in words)
            if is_pip and "install" in words:
                commands.append(words[words.index("install") + 1 :])
    return commands


def pinned(commands: list[list[str]]) -> dict[str, tuple[str, bool]]:
    """{package: (pin, installed with --no-deps)} of the `name==version` arguments."""
    out = {}
    for args in commands:
        for arg in args:
            if "==" in arg:
                name, version = arg.split("==", 1)
                out[name.lower()] = (version, "--no-deps" in args)
    return out


def test_image_installs_what_the_dev_install_does():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    dev = pinned(pip_installs((INFRA / "dev" / "install.sh").read_text()))
    image_commands = pip_installs(dockerfile)
    image = pinned(image_commands)
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    # torch: the same pin, installed on its own before the project (so pip never swaps it).
    assert image["torch"] == dev["torch"] and not image["torch"][1]
    project = [args for args in image_commands if "." in args]
    assert len(project) == 1, "the image installs the project with `pip install .`"
    # The project's own pin agrees, so `pip install .` keeps that torch.
    assert '"torch==' + dev["torch"][0] + '"' in (REPO / "pyproject.toml").read_text()
    # tinysoundfont: the same pin, without its declared dependencies (pyaudio).
    assert image["tinysoundfont"] == dev["tinysoundfont"] == ("0.3.7", True)
    # The same order as install.sh: torch, tinysoundfont, the project.
    def order(commands):
        steps = []
        for args in commands:
            steps += [a.split("==")[0] for a in args if a.split("==")[0] in ("torch", "tinysoundfont")]
            steps += ["project"] if any(a == "." or a.startswith(".[") for a in args) else []
        return steps

    assert order(image_commands) == order(pip_installs((INFRA / "dev" / "install.sh").read_text()))
    assert order(image_commands) == ["torch", "tinysoundfont", "project"]
    # Whatever else install.sh installs without dependencies is for the tests / reference only.
    assert set(k for k, (_, no_deps) in dev.items() if no_deps) - set(image) == {"uss"}
    for folder in ("uss_core", "pipelines", "jobs"):
        assert re.search(rf"^COPY {folder} ", dockerfile, re.M), folder


def test_uss_bulk_separate_dispatches_to_the_job(capsys):
    from jobs.cli import COMMANDS, main

    assert COMMANDS["bulk-separate"][0] == "jobs.separate"
    with pytest.raises(SystemExit) as exit_info:
        main(["bulk-separate", "--help"])
    assert exit_info.value.code == 0
    assert "--input" in capsys.readouterr().out
