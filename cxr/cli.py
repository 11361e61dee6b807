"""`cxr`: the command-line client (installed into .venv/bin by `make setup`).

    cxr predict [--protocol rest|grpc] [--model NAME] [--version V] IMAGE...
    cxr models
    cxr explain IMAGE --out heatmap.png [--model pneumonia_eager]
    cxr deploy ARCHIVE [--model NAME]     # new version next to the old, checked, made default, old retired
    cxr rollback [--model NAME]           # bring back the version the last deploy retired
    cxr scale WORKERS [--model NAME] [--version V]
    cxr dicom-node --allow ORTHANC [--send-to ORTHANC@127.0.0.1:4242] [--config node.toml]   # cxr.dicom.node
    cxr audit [--study UID] [--outcome answered|refused|skipped|rejected|pending] [--since ISO] [--spool DIR]

`predict` prints one JSON answer per image, in order, on its own line (the same JSON as the REST API); an
image that fails prints {"file", "code", "error", ...the refusal's fields} instead and makes the exit status
1. An X-ray outside the model's population (refused, or answered with `population_check: warn`) also gets a
plain line on stderr saying whom the model is for. The connection options
(--key-file, --host, --port, ...) go before or after the subcommand.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from datetime import datetime
from pathlib import Path

from cxr import lifecycle
from cxr.client import Client, PredictionError
from cxr.dicom.config import add_options as add_node_options
from cxr.dicom.config import config_from as node_config
from cxr.dicom.node import serve as serve_node
from cxr.dicom.spool import read_audit
from cxr.paths import samples_dir
from cxr.server import KeyFileError

EXAMPLES = {
    "predict": "cxr predict tests/fixtures/xrays/PNEUMONIA/person100_bacteria_475.jpeg\n"
               "cxr predict --protocol grpc --model cxr4 xray1.png xray2.dcm",
    "models": "cxr models",
    "explain": "cxr explain tests/fixtures/xrays/PNEUMONIA/person100_bacteria_475.jpeg --out heatmap.png",
    "deploy": "make archive VERSION=2.0 && cxr deploy pneumonia-2.0.mar",
    "rollback": "cxr rollback --model pneumonia",
    "scale": "cxr scale 2 --model pneumonia",
    "dicom-node": "cxr dicom-node --allow ORTHANC --send-to ORTHANC@127.0.0.1:4242",
    "audit": "cxr audit --outcome refused --since 2026-12-01T00:00",
}


def _connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The same options on the main parser (with defaults) and on every subcommand (without, so a value given
    before the subcommand is not reset)."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--key-file", default=default("logs/serve/key_file.json"), help="TorchServe's key_file.json")
    parser.add_argument("--host", default=default("127.0.0.1"))
    parser.add_argument("--port", type=int, default=default(None), help="inference port (REST) override")
    parser.add_argument("--grpc-port", type=int, default=default(None), help="gRPC inference port override")
    parser.add_argument("--management-port", type=int, default=default(None))
    parser.add_argument("--timeout", type=float, default=default(30.0), help="seconds per call")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, epilog=f"example:\n  {EXAMPLES[name]}"
                                  .replace("\n", "\n  "), formatter_class=argparse.RawDescriptionHelpFormatter)
        _connection_options(sub, defaults=False)
        return sub

    predict = command("predict", "classify X-ray image files (JPEG, PNG, DICOM, ...)")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--protocol", choices=["rest", "grpc"], default="rest")
    predict.add_argument("--model", default="pneumonia")
    predict.add_argument("--version", default=None)
    command("models", "list models, versions and workers")
    explain = command("explain", "Grad-CAM overlay of where the model looked")
    explain.add_argument("image", type=Path)
    explain.add_argument("--out", type=Path, required=True, help="PNG file for the overlay")
    explain.add_argument("--model", default="pneumonia_eager", help="an eager archive (the others do not explain)")
    for name, text in (("deploy", "swap in a new archive version with no downtime"),
                       ("rollback", "bring back the version that the last deploy retired")):
        sub = command(name, text)
        if name == "deploy":
            sub.add_argument("archive", help="archive file name in the server's model store")
        sub.add_argument("--model", default="pneumonia")
        sub.add_argument("--workers", type=int, default=1)
        sub.add_argument("--samples", default=str(samples_dir()), help="folder of X-rays the new version must answer")
        sub.add_argument("--history", default=None, help="deploy history file (default: next to the key file)")
    scale = command("scale", "set the number of workers")
    scale.add_argument("workers", type=int)
    scale.add_argument("--model", default="pneumonia")
    scale.add_argument("--version", default=None)
    node = commands.add_parser("dicom-node", help="the DICOM node: receive films, answer with SRs (foreground)",
                               epilog=f"example:\n  {EXAMPLES['dicom-node']}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_node_options(node)
    audit = commands.add_parser("audit", help="the DICOM node's audit log, one JSON line per row",
                                epilog=f"example:\n  {EXAMPLES['audit']}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    audit.add_argument("--spool", default="logs/dicom", help="the node's spool folder")
    audit.add_argument("--study", default=None, help="Study Instance UID")
    audit.add_argument("--outcome", default=None,
                       choices=["answered", "refused", "skipped", "rejected", "failed", "pending"])
    audit.add_argument("--since", default=None, help="ISO time, e.g. 2026-12-01T08:00")
    audit.add_argument("--until", default=None, help="ISO time")
    return parser


def _samples(folder: str, limit: int = 8) -> list[bytes]:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not paths:
        raise SystemExit(f"cxr: no sample X-rays under {folder} to check the new version with (--samples)")
    return [path.read_bytes() for path in paths[:: max(1, len(paths) // limit)][:limit]]


def _client(args: argparse.Namespace) -> Client:
    ports = {name: port for name, port in (("inference", args.port), ("grpc_inference", args.grpc_port),
                                           ("management", args.management_port)) if port}
    try:
        return Client.from_key_file(args.key_file, host=args.host, ports=ports, timeout=args.timeout)
    except KeyFileError as error:
        raise SystemExit(f"cxr: {error}") from None


def _read(path: Path) -> bytes:
    """The file's bytes, or a PredictionError-like refusal naming the file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PredictionError(400, "no such file") from None
    except OSError as error:
        raise PredictionError(400, f"cannot read file: {error.strerror or error}") from None


def _unreachable(error: PredictionError) -> bool:
    """The client's refusal for a server that did not answer (connection refused after the retries)."""
    return error.status == 503 and "cannot reach" in error.message


def _not_about_the_image(error: PredictionError) -> bool:
    return error.status == 404 or _unreachable(error)


def _explain_failure(client: Client, args: argparse.Namespace, error: PredictionError) -> str:
    """One line for a failure that is not about an image: server down, unknown model."""
    if _unreachable(error):
        return f"cxr {args.command}: no TorchServe answers at {args.host} ({error.message}); start it with `make serve`"
    if error.status == 404 and getattr(args, "model", None):
        try:
            served = sorted({entry["modelName"] for entry in client.models()})
        except PredictionError:
            served = []
        return f"cxr {args.command}: no model named {args.model!r}; served: {', '.join(served) or 'none'}"
    return f"cxr {args.command}: {error}"


def _population_line(path: Path, fields: dict) -> str | None:
    """One plain line when the answer or refusal says the X-ray is outside the model's population."""
    population = fields.get("population") or {}
    if population.get("inside") is not False:
        return None
    intended = fields.get("intended_population") or population.get("intended_population") or "?"
    card = fields.get("model_card") or population.get("model_card") or "?"
    return (f"cxr: {path}: outside the model's population (score {population.get('score')} > limit "
            f"{population.get('limit')}); the model is for: {intended}; see {card}")


def _predict(client: Client, args: argparse.Namespace) -> int:
    failures = 0
    for path in args.images:
        try:
            answer = client.predict(_read(path), model=args.model, version=args.version, protocol=args.protocol)
        except PredictionError as error:
            if _not_about_the_image(error):
                raise
            answer = {"file": str(path), "code": error.status, "error": error.message, **error.details}
            failures += 1
        print(json.dumps(answer), flush=True)
        line = _population_line(path, answer) if isinstance(answer, dict) else None
        if line:
            print(line, file=sys.stderr, flush=True)
    return 1 if failures else 0


def _run(client: Client, args: argparse.Namespace) -> int:
    if args.command == "predict":
        return _predict(client, args)
    if args.command in ("deploy", "rollback"):
        history = Path(args.history) if args.history else Path(args.key_file).parent / "deployments.json"
        samples = _samples(args.samples)
        if args.command == "deploy":
            result = lifecycle.deploy(client, args.model, args.archive, samples, history, args.workers)
        else:
            result = lifecycle.rollback(client, args.model, samples, history, args.workers)
        print(json.dumps(result))
    elif args.command == "explain":
        try:
            image = _read(args.image)
        except PredictionError as error:
            print(json.dumps({"file": str(args.image), "code": error.status, "error": error.message}))
            return 1
        answer = client.explain(image, model=args.model)
        args.out.write_bytes(base64.b64decode(answer.pop("overlay_png")))
        answer.pop("heatmap")
        print(json.dumps({**answer, "overlay": str(args.out)}))
    elif args.command == "scale":
        print(json.dumps(client.scale(args.model, args.workers, args.version)))
    elif args.command == "models":
        for entry in client.models():
            workers = [f"{w['id']}:{w['status']}" for w in entry.get("workers", [])]
            try:  # the handler's describe: whom the model is for
                [described] = client.describe(entry["modelName"], entry["modelVersion"], customized=True)
                custom = described.get("customizedMetadata") or {}
            except (PredictionError, ValueError):
                custom = {}
            custom = custom if isinstance(custom, dict) else {}
            print(json.dumps({"model": entry["modelName"], "version": entry["modelVersion"],
                              "workers": workers, "batch_size": entry.get("batchSize"),
                              "max_batch_delay": entry.get("maxBatchDelay"),
                              "intended_population": custom.get("intended_population"),
                              "model_card": custom.get("model_card"),
                              "population_check": custom.get("population_check")}))
    return 0


def _audit(args: argparse.Namespace) -> int:
    def seconds(text: str | None) -> float | None:
        return None if text is None else datetime.fromisoformat(text).timestamp()

    try:
        rows = read_audit(args.spool, study=args.study, outcome=args.outcome, since=seconds(args.since),
                          until=seconds(args.until))
    except FileNotFoundError as error:
        print(f"cxr audit: {error}", file=sys.stderr)
        return 1
    for row in rows:
        print(json.dumps(row))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "audit":
        return _audit(args)
    if args.command == "dicom-node":
        serve_node(node_config(args))
        return 0
    client = _client(args)
    try:
        return _run(client, args)
    except lifecycle.DeployError as error:
        print(f"cxr {args.command}: {error}", file=sys.stderr)
    except PredictionError as error:
        print(_explain_failure(client, args, error), file=sys.stderr)
    finally:
        client.close()
    return 1


if __name__ == "__main__":
    sys.exit(main())
