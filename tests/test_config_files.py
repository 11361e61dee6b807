"""The shipped settings are safe on their own: loopback only, token auth on, no remote archives."""

from pathlib import Path

import yaml

from cxr.server import write_config
from tests.conftest import REPO


def properties(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def test_torchserve_defaults_are_closed():
    config = properties(REPO / "config.properties")
    for key in ("inference_address", "management_address", "metrics_address"):
        assert config[key].startswith("http://127.0.0.1:"), key
    assert config["grpc_inference_address"] == "127.0.0.1" and config["grpc_management_address"] == "127.0.0.1"
    assert (config["inference_address"], config["management_address"], config["metrics_address"]) == (
        "http://127.0.0.1:8080", "http://127.0.0.1:8081", "http://127.0.0.1:8082")
    assert (config["grpc_inference_port"], config["grpc_management_port"]) == ("7070", "7071")
    assert config["disable_token_authorization"] == "false"
    assert config["enable_model_api"] == "true"  # registration for model swaps: loopback + token + local store
    assert config["enable_envvars_config"] == "false"
    assert config["allowed_urls"].startswith("file://") and "http" not in config["allowed_urls"]
    assert int(config["max_request_size"]) <= 16 * 1024 * 1024


def test_generated_test_config_only_moves_ports(tmp_path):
    path = write_config(tmp_path / "c.properties", tmp_path / "store", {"inference": 18080, "grpc_inference": 17070})
    config = properties(path)
    assert config["inference_address"] == "http://127.0.0.1:18080"
    assert config["grpc_inference_port"] == "17070"
    assert config["management_address"] == "http://127.0.0.1:8081"
    assert config["disable_token_authorization"] == "false"
    assert config["model_store"] == str((tmp_path / "store").resolve())


def test_model_config_is_valid_yaml_with_handler_settings():
    config = yaml.safe_load((REPO / "handlers" / "model-config.yaml").read_text())
    assert config["batchSize"] >= 1 and config["maxBatchDelay"] >= 0
    assert {"threads", "max_image_bytes", "max_images_per_request"} <= set(config["handler"])


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
