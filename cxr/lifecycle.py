"""Zero-downtime model swaps through the management API: deploy a new version next to the running one,
check it, make it the default, retire the old one; roll back the same way. Each deploy is recorded in a
history file next to the key file, so `rollback` knows which archive to bring back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cxr.client import Client, PredictionError


class DeployError(Exception):
    """A new version failed its checks; it was unregistered and the old one stays the default."""


def _load_history(path: Path) -> dict[str, list[dict[str, str]]]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_history(path: Path, history: dict[str, list[dict[str, str]]]) -> None:
    path.write_text(json.dumps(history, indent=2) + "\n")


def _entry(client: Client, model: str, version: str) -> dict[str, Any]:
    """The management API's description of one version of `model`."""
    return next(entry for entry in client.describe(model) if entry["modelVersion"] == version)


def check_version(client: Client, model: str, version: str, samples: list[bytes]) -> None:
    """Every sample must get a well-formed answer from exactly that version."""
    for index, data in enumerate(samples):
        try:
            answer = client.predict(data, model=model, version=version)
        except PredictionError as error:
            raise DeployError(f"sample {index} failed on {model} {version}: {error}") from error
        if answer.get("version") != version or "label" not in answer:
            raise DeployError(f"sample {index}: unexpected answer from {model} {version}: {answer}")


def drain(client: Client, model: str, version: str, grace: float = 2.0, timeout: float = 60.0) -> None:
    """Wait until no request is queued for `version` (it is no longer the default, so nothing new arrives),
    then `grace` seconds for the batch its workers are running. Unregistering earlier loses those requests:
    TorchServe 0.12 drops jobs still assigned to a worker it scales down."""
    deadline, quiet = time.monotonic() + timeout, 0
    while quiet < 3 and time.monotonic() < deadline:
        pending = _entry(client, model, version).get("jobQueueStatus", {}).get("pendingRequests", 0)
        quiet = quiet + 1 if pending == 0 else 0
        time.sleep(0.2)
    time.sleep(grace)


def swap(client: Client, model: str, archive: str, samples: list[bytes], workers: int = 1) -> dict[str, Any]:
    """Register `archive` as a new version of `model`, check it, make it the default, retire the old one."""
    old_version = client.default_version(model)
    before = {entry["modelVersion"] for entry in client.describe(model)}
    client.register(archive, model, initial_workers=workers)
    new_versions = {entry["modelVersion"] for entry in client.describe(model)} - before
    if len(new_versions) != 1:
        raise DeployError(f"{archive} did not add a new version of {model} (versions before: {sorted(before)}); "
                          "build it with another --version")
    new_version = new_versions.pop()
    try:
        check_version(client, model, new_version, samples)
    except DeployError:
        client.unregister(model, new_version)
        raise
    client.set_default(model, new_version)
    drain(client, model, old_version)
    client.unregister(model, old_version)
    return {"model": model, "old_version": old_version, "new_version": new_version, "archive": archive}


def deploy(client: Client, model: str, archive: str, samples: list[bytes], history_file: Path,
           workers: int = 1) -> dict[str, Any]:
    history = _load_history(history_file)
    old_archive = Path(_entry(client, model, client.default_version(model))["modelUrl"]).name
    result = swap(client, model, archive, samples, workers)
    history.setdefault(model, []).append({"version": result["old_version"], "archive": old_archive})
    _save_history(history_file, history)
    return result


def rollback(client: Client, model: str, samples: list[bytes], history_file: Path,
             workers: int = 1) -> dict[str, Any]:
    """Bring back the version that the last deploy retired."""
    history = _load_history(history_file)
    if not history.get(model):
        raise DeployError(f"nothing to roll back to for {model}: no deploy recorded in {history_file}")
    previous = history[model][-1]
    result = swap(client, model, previous["archive"], samples, workers)
    history[model].pop()
    _save_history(history_file, history)
    return result
