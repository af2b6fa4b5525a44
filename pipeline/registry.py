"""The model registry: a prefix holding model versions and a `champion` pointer.

    <registry>/<version>/model.safetensors, model.json
    <registry>/champion.json        {"version": ..., "uri": ..., "promoted": ..., "reason": ...}
    <registry>/last_training.json   {"version": ..., "trained_at": ...}

A model URI given to resflow may be a model folder or a registry; a registry resolves to
its champion.
"""

from __future__ import annotations

import datetime as dt
import json

from pipeline import storage
from pipeline.modelio import CARD_FILE, ModelLoadError

CHAMPION_FILE = "champion.json"
LAST_TRAINING_FILE = "last_training.json"  # when a challenger was last trained (the nightly cadence)


def version_uri(registry: str, version: str) -> str:
    return storage.join(registry, version)


def champion(registry: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(registry, CHAMPION_FILE)))
    except FileNotFoundError:
        return None


def set_champion(registry: str, version: str, reason: str = "") -> dict:
    uri = version_uri(registry, version)
    if not storage.exists(storage.join(uri, CARD_FILE)):
        raise ModelLoadError(f"cannot promote {version}: {uri} holds no model")
    record = {"version": version, "uri": uri, "promoted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "reason": reason}
    storage.write_bytes(storage.join(registry, CHAMPION_FILE), json.dumps(record, indent=2).encode())
    return record


def resolve(model_uri: str) -> str:
    """A model folder as is; a registry -> its champion's folder."""
    if storage.exists(storage.join(model_uri, CARD_FILE)):
        return model_uri
    current = champion(model_uri)
    if current:
        return current["uri"]
    raise ModelLoadError(f"{model_uri} is neither a model folder (no {CARD_FILE}) nor a registry with a champion "
                         f"({CHAMPION_FILE}); train one with `resflow train --output {model_uri}`")


def record_training(registry: str, version: str) -> dict:
    record = {"version": version, "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    storage.write_bytes(storage.join(registry, LAST_TRAINING_FILE), json.dumps(record, indent=2).encode())
    return record


def last_training(registry: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(registry, LAST_TRAINING_FILE)))
    except FileNotFoundError:
        return None
