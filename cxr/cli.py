"""`cxr`: the command-line client (installed into .venv/bin by `make setup`).

    cxr predict [--protocol rest|grpc] [--model NAME] [--version V] IMAGE...
    cxr models
    cxr explain IMAGE --out heatmap.png [--model pneumonia_eager]
    cxr deploy ARCHIVE [--model NAME]     # new version next to the old, checked, made default, old retired
    cxr rollback [--model NAME]           # bring back the version the last deploy retired
    cxr scale WORKERS [--model NAME] [--version V]

`predict` prints one JSON answer per image, in order, on its own line (the same JSON as the REST API); an
image that fails prints {"file", "code", "error"} instead and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from cxr import lifecycle
from cxr.client import Client, PredictionError

DEFAULT_SAMPLES = "../shared/data/samples"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key-file", default="logs/serve/key_file.json", help="TorchServe's key_file.json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="inference port (REST) override")
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC inference port override")
    parser.add_argument("--management-port", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=30.0)
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify X-ray image files")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--protocol", choices=["rest", "grpc"], default="rest")
    predict.add_argument("--model", default="pneumonia")
    predict.add_argument("--version", default=None)
    commands.add_parser("models", help="list models, versions and workers")
    explain = commands.add_parser("explain", help="Grad-CAM overlay of where the model looked")
    explain.add_argument("image", type=Path)
    explain.add_argument("--out", type=Path, required=True, help="PNG file for the overlay")
    explain.add_argument("--model", default="pneumonia_eager", help="an eager archive (the others do not explain)")
    for name, text in (("deploy", "swap in a new archive version with no downtime"),
                       ("rollback", "bring back the version that the last deploy retired")):
        command = commands.add_parser(name, help=text)
        if name == "deploy":
            command.add_argument("archive", help="archive file name in the server's model store")
        command.add_argument("--model", default="pneumonia")
        command.add_argument("--workers", type=int, default=1)
        command.add_argument("--samples", default=DEFAULT_SAMPLES, help="folder of X-rays the new version must answer")
        command.add_argument("--history", default=None, help="deploy history file (default: next to the key file)")
    scale = commands.add_parser("scale", help="set the number of workers")
    scale.add_argument("workers", type=int)
    scale.add_argument("--model", default="pneumonia")
    scale.add_argument("--version", default=None)
    return parser


def _samples(folder: str, limit: int = 8) -> list[bytes]:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not paths:
        raise SystemExit(f"cxr: no sample X-rays under {folder} to check the new version with (--samples)")
    return [path.read_bytes() for path in paths[:: max(1, len(paths) // limit)][:limit]]


def _client(args: argparse.Namespace) -> Client:
    ports = {name: port for name, port in (("inference", args.port), ("grpc_inference", args.grpc_port),
                                           ("management", args.management_port)) if port}
    key_file = Path(args.key_file)
    if not key_file.is_file():
        raise SystemExit(f"cxr: no key file at {key_file} (start the server with `make serve`, or pass --key-file)")
    return Client.from_key_file(key_file, host=args.host, ports=ports, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    client = _client(args)
    failures = 0
    try:
        if args.command in ("deploy", "rollback"):
            history = Path(args.history) if args.history else Path(args.key_file).parent / "deployments.json"
            samples = _samples(args.samples)
            if args.command == "deploy":
                result = lifecycle.deploy(client, args.model, args.archive, samples, history, args.workers)
            else:
                result = lifecycle.rollback(client, args.model, samples, history, args.workers)
            print(json.dumps(result))
            return 0
        if args.command == "explain":
            answer = client.explain(args.image.read_bytes(), model=args.model)
            args.out.write_bytes(base64.b64decode(answer.pop("overlay_png")))
            answer.pop("heatmap")
            print(json.dumps({**answer, "overlay": str(args.out)}))
            return 0
        if args.command == "scale":
            print(json.dumps(client.scale(args.model, args.workers, args.version)))
            return 0
        if args.command == "models":
            for entry in client.models():
                workers = [f"{w['id']}:{w['status']}" for w in entry.get("workers", [])]
                print(json.dumps({"model": entry["modelName"], "version": entry["modelVersion"],
                                  "workers": workers, "batch_size": entry.get("batchSize"),
                                  "max_batch_delay": entry.get("maxBatchDelay")}))
            return 0
        for path in args.images:
            try:
                answer = client.predict(path.read_bytes(), model=args.model, version=args.version,
                                        protocol=args.protocol)
            except OSError as error:
                answer = {"file": str(path), "code": 400, "error": f"cannot read file: {error}"}
                failures += 1
            except PredictionError as error:
                answer = {"file": str(path), "code": error.status, "error": error.message}
                failures += 1
            print(json.dumps(answer), flush=True)
    except (lifecycle.DeployError, PredictionError) as error:
        print(f"cxr {args.command}: {error}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
