"""The DICOM node's options: on the command line (`cxr dicom-node`, `python -m cxr.dicom.node`) and in a TOML
file with the same names (`-` as `_`); the command line wins."""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class NodeConfig:
    """Every option, on the command line or in a TOML file (same names, `-` as `_`)."""

    ae_title: str = "CXR"
    host: str = "127.0.0.1"
    port: int = 11112
    allow: tuple[str, ...] = ()  # calling AE titles that may associate; required
    models: tuple[str, ...] = ("pneumonia",)
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # calling AE -> its models
    send_to: str | None = None  # AET@HOST:PORT for the SRs; None: kept in <spool>/reports
    fhir_dir: str | None = None
    fhir_url: str | None = None  # FHIR base URL: PUT <url>/DiagnosticReport/<id>
    secondary_capture: bool = False  # also the Grad-CAM overlay as an image in the study (asks <model>_eager)
    spool: str = "logs/dicom"
    key_file: str = "logs/serve/key_file.json"
    inference_port: int = 8080
    management_port: int = 8081  # only to name the served version in a refusal's report
    grpc_port: int = 7070
    protocol: str = "rest"
    max_bytes: int = 64 * 1024 * 1024  # larger datasets are refused (out of resources)
    workers: int = 8  # films answered at once (TorchServe batches them; the others wait on the PACS meanwhile)
    max_delay: float = 10.0
    max_failures: int = 5

    def models_for(self, calling_ae: str) -> tuple[str, ...]:
        return self.routes.get(calling_ae, self.models)

    def destination(self) -> tuple[str, str, int] | None:
        if not self.send_to:
            return None
        title, _, address = self.send_to.partition("@")
        host, _, port = address.rpartition(":")
        if not (title and host and port.isdigit()):
            raise ValueError(f"--send-to {self.send_to!r}: expected AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)")
        return title, host, int(port)


def load_config(path: str | None, overrides: dict[str, Any]) -> NodeConfig:
    """The TOML file's values, then the command line's (those not None)."""
    values: dict[str, Any] = {}
    if path:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {f.name for f in fields(NodeConfig)}
    unknown = set(values) - known
    if unknown:
        raise SystemExit(f"dicom-node: unknown options {sorted(unknown)}; known: {sorted(known)}")
    for key in ("allow", "models"):
        if isinstance(values.get(key), str):
            values[key] = tuple(part.strip() for part in values[key].split(",") if part.strip())
    if "routes" in values:
        values["routes"] = {ae: tuple(models) if not isinstance(models, str) else tuple(models.split(","))
                            for ae, models in values["routes"].items()}
    config = NodeConfig(**{key: tuple(v) if isinstance(v, list) else v for key, v in values.items()})
    if not config.allow:
        raise SystemExit("dicom-node: no calling AE title is allowed: give --allow AET[,AET...] (e.g. ORTHANC)")
    config.destination()
    return config


def add_options(parser: argparse.ArgumentParser) -> None:
    """The node's options (defaults None: the config file or NodeConfig decides)."""
    parser.add_argument("--config", default=None, help="TOML file with any of these options")
    parser.add_argument("--port", type=int)
    parser.add_argument("--ae-title")
    parser.add_argument("--allow", help="calling AE titles allowed to send, comma-separated (required)")
    parser.add_argument("--send-to", help="AET@HOST:PORT that receives the SRs (usually the sending PACS)")
    parser.add_argument("--fhir-dir", help="folder for the FHIR DiagnosticReport JSON files")
    parser.add_argument("--fhir-url", help="FHIR base URL (PUT DiagnosticReport/<id>)")
    parser.add_argument("--models", help="models asked for each film, comma-separated (default pneumonia)")
    parser.add_argument("--spool", help="queue, audit log and kept reports (default logs/dicom)")
    parser.add_argument("--key-file", help="TorchServe's key_file.json (default logs/serve/key_file.json)")
    parser.add_argument("--inference-port", type=int)
    parser.add_argument("--management-port", type=int)
    parser.add_argument("--protocol", choices=["rest", "grpc"])
    parser.add_argument("--workers", type=int)
    parser.add_argument("--secondary-capture", action="store_true", default=None,
                        help="also send the Grad-CAM overlay as a Secondary Capture image (the <model>_eager archive)")


def config_from(args: argparse.Namespace) -> NodeConfig:
    names = ("port", "ae_title", "allow", "send_to", "fhir_dir", "fhir_url", "models", "spool", "key_file",
             "inference_port", "management_port", "protocol", "workers", "secondary_capture")
    return load_config(args.config, {name: getattr(args, name, None) for name in names})
