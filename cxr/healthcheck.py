"""Container health check: exit 0 when TorchServe answers /ping as Healthy (with the key it wrote at start).

    python -m cxr.healthcheck --key-file /home/model-server/key_file.json [--port 8080]

Used by the Dockerfile's HEALTHCHECK and the Kubernetes exec probes: with token authorization on, /ping needs
the inference key, which is generated at start, so a plain HTTP probe cannot carry it.
"""

from __future__ import annotations

import sys

from cxr.client import Client, PredictionError
from cxr.commands import command_parser


def main() -> int:
    parser = command_parser(__doc__)
    parser.add_argument("--key-file", default="key_file.json")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    try:
        client = Client.from_key_file(args.key_file, ports={"inference": args.port}, timeout=args.timeout, retries=0)
        status = client.ping()
    except (OSError, ValueError, KeyError, PredictionError) as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "Healthy" else 1


if __name__ == "__main__":
    sys.exit(main())
