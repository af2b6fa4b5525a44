"""The model registry: a prefix holding model versions and a `champion` pointer.

    <registry>/<version>/model.safetensors, model.json
    <registry>/champion.json        {"version": ..., "uri": ..., "promoted": ..., "reason": ...}
    <registry>/last_training.json   {"version": ..., "trained_at": ...}

A model URI given to resflow may be a model folder or a registry; a registry resolves to
its champion. Promotion replaces champion.json only if it is still the one the caller
decided against (a conditional write), so two promotions at once cannot both win.
"""

from __future__ import annotations

import datetime as dt
import json

from pipeline import storage
from pipeline.modelio import CARD_FILE, ModelCard, ModelLoadError, read_card

CHAMPION_FILE = "champion.json"
LAST_TRAINING_FILE = "last_training.json"  # when a challenger was last trained (the nightly cadence)


class PromotionConflict(RuntimeError):
    """The champion changed between deciding to promote and promoting."""


def version_uri(registry: str, version: str) -> str:
    return storage.join(registry, version)


def champion(registry: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(registry, CHAMPION_FILE)))
    except FileNotFoundError:
        return None


def versions(registry: str) -> list[ModelCard]:
    """Every model version in the registry (folders holding a model card), oldest first."""
    try:
        found = storage.list_files(registry, suffixes=(f"/{CARD_FILE}",))
    except FileNotFoundError:
        return []
    cards = [read_card(info.uri.rsplit("/", 1)[0]) for info in found]
    return sorted(cards, key=lambda card: (card.created, card.version))


def set_champion(registry: str, version: str, reason: str = "", expected: str | None = "any") -> dict:
    """Make `version` the champion. `expected` is the champion version the caller decided
    against (None: there was none); if the champion is another by now, PromotionConflict.
    The default, "any", promotes whatever the champion is (a person deciding by hand)."""
    uri = version_uri(registry, version)
    if not storage.exists(storage.join(uri, CARD_FILE)):
        raise ModelLoadError(f"cannot promote {version}: {uri} holds no model (see `resflow models list {registry}`)")
    pointer = storage.join(registry, CHAMPION_FILE)
    record = {"version": version, "uri": uri, "promoted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "reason": reason}
    body = json.dumps(record, indent=2).encode()
    current = storage.read_with_age(pointer)
    current_version = json.loads(current[0])["version"] if current else None
    if expected != "any" and expected != current_version:
        raise PromotionConflict(f"the champion of {registry} is {current_version}, not {expected} as when this "
                                f"promotion was decided; decide again against the new champion")
    stored = (storage.replace_if_match(pointer, body, current[1].etag) if current else
              storage.create_exclusive(pointer, body))
    if stored is None:
        raise PromotionConflict(f"another promotion in {registry} happened at the same time; see "
                                f"`resflow models list {registry}` and decide again")
    return record


def resolve(model_uri: str) -> str:
    """A model folder as is; a registry -> its champion's folder."""
    if storage.exists(storage.join(model_uri, CARD_FILE)):
        return model_uri
    current = champion(model_uri)
    if current:
        return current["uri"]
    found = versions(model_uri)
    if found:
        raise ModelLoadError(f"{model_uri} is a registry with {len(found)} model version(s) but no champion yet; "
                             f"promote one with `resflow models promote {model_uri} {found[-1].version}` (the newest), "
                             f"or give a version's folder as the model ({version_uri(model_uri, found[-1].version)})")
    raise ModelLoadError(f"{model_uri} is neither a model folder (no {CARD_FILE}) nor a registry with a champion "
                         f"({CHAMPION_FILE}); train one with `resflow train --registry {model_uri}`")


def record_training(registry: str, version: str) -> dict:
    record = {"version": version, "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    storage.write_bytes(storage.join(registry, LAST_TRAINING_FILE), json.dumps(record, indent=2).encode())
    return record


def last_training(registry: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(registry, LAST_TRAINING_FILE)))
    except FileNotFoundError:
        return None
