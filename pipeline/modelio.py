"""Model folders: `model.safetensors` (weights) + `model.json` (how to rebuild and judge them).

Loading never unpickles: weights come only through safetensors, which parses a JSON
header and raw tensors, so a model folder from shared storage cannot run code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline import storage
from pipeline.models import build_model, model_config

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
FORMAT = "resflow-model/1"
# A card is data from storage: a network it describes beyond this is refused before any
# layer is allocated (DnCNN-S has 0.56 M parameters; the largest preset a few million).
MAX_PARAMETERS = 100_000_000
SAFETENSORS_HEADER_BYTES = 1 << 20  # room for the weights file's JSON header beside the tensors


class ModelLoadError(RuntimeError):
    """A model folder that cannot be used, with the reason."""


@dataclass
class ModelCard:
    architecture: str
    config: dict
    version: str = ""
    created: str = ""
    degradation: dict | None = None  # what the model was trained to undo (Degradation.to_dict())
    data_fingerprint: str | None = None  # identifies the training data (file names, sizes, ETags)
    metrics: dict = field(default_factory=dict)  # e.g. {"val_psnr": 29.1, "val_ssim": 0.83}
    training: dict = field(default_factory=dict)  # preset, epochs, wall time, ...
    weights_sha256: str = ""
    format: str = FORMAT
    channels: int = 1  # 1: gray, 3: colour (RGB restored jointly); from config, kept here for readers of the card

    @property
    def color_kind(self) -> str:
        """What `resflow models show` and `list` say: gray or colour."""
        return "colour (RGB)" if self.channels == 3 else "gray"

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def state_dict_bytes(model: nn.Module) -> bytes:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    return save_safetensors(tensors, metadata={"format": "pt"})


def save_model(uri: str, model: nn.Module, *, version: str | None = None, degradation: dict | None = None,
               data_fingerprint: str | None = None, metrics: dict | None = None, training: dict | None = None) -> ModelCard:
    """Write a model folder. The card is written last, so a folder with a card is complete."""
    architecture, config = model_config(model)
    weights = state_dict_bytes(model)
    digest = hashlib.sha256(weights).hexdigest()
    now = dt.datetime.now(dt.timezone.utc)
    card = ModelCard(
        architecture=architecture, config=config,
        version=version or f"{architecture}-{now:%Y%m%d-%H%M%S}-{digest[:8]}",
        created=now.isoformat(timespec="seconds"), degradation=degradation, data_fingerprint=data_fingerprint,
        metrics=metrics or {}, training=training or {}, weights_sha256=digest, channels=config.get("channels", 1),
    )
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    storage.write_bytes(storage.join(uri, CARD_FILE), card.to_json().encode())
    return card


def _looks_like_safetensors(data: bytes) -> bool:
    """8-byte little-endian header length, then a JSON object of that length."""
    if len(data) < 10:
        return False
    header_length = int.from_bytes(data[:8], "little")
    return 2 <= header_length <= len(data) - 8 and data[8:9] == b"{"


def _looks_pickled(data: bytes) -> str | None:
    # A safetensors header length of 0x0280-0x05ff bytes starts with the same two bytes as
    # a pickle (0x80, protocol 2-5), so a valid safetensors layout is recognised first.
    if _looks_like_safetensors(data):
        return None
    if data[:2] == b"PK":
        return "a zip archive (torch.save format)"
    if data[:1] == b"\x80" and len(data) > 1 and data[1] in range(2, 6):
        return "a Python pickle"
    return None


def read_card(uri: str) -> ModelCard:
    card_uri = storage.join(uri, CARD_FILE)
    try:
        raw = json.loads(storage.read_bytes(card_uri))
    except FileNotFoundError as error:
        raise ModelLoadError(f"no {CARD_FILE} in {uri}: not a resflow model folder (train one with `resflow train`)") from error
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{card_uri} is not valid JSON: {error}") from error
    if raw.get("format") != FORMAT:
        raise ModelLoadError(f"{card_uri} has format {raw.get('format')!r}, expected {FORMAT!r}")
    known = set(ModelCard.__dataclass_fields__)
    card = {key: value for key, value in raw.items() if key in known}
    card["channels"] = int((raw.get("config") or {}).get("channels", 1))  # cards written before the field: from config
    return ModelCard(**card)


def weights_bytes(card: ModelCard, card_uri: str) -> int:
    """How large the card's network's weights are, measured on a network built without
    memory (torch's meta device); a card asking for more than MAX_PARAMETERS is refused."""
    try:
        with torch.device("meta"):
            network = build_model(card.architecture, **card.config)
    except (ValueError, TypeError) as error:
        raise ModelLoadError(f"{card_uri} describes no network resflow can build: {error}") from error
    tensors = list(network.state_dict().values())
    parameters = sum(tensor.numel() for tensor in tensors)
    if parameters > MAX_PARAMETERS:
        raise ModelLoadError(f"{card_uri} describes a {card.architecture} of {parameters:,} parameters, over the "
                             f"limit of {MAX_PARAMETERS:,}: refused before allocating it")
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def load_model(uri: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the network from model.json and load weights from model.safetensors: the
    card must carry the weights' checksum and describe a network of a sane size, and the
    weights are read no further than that size."""
    card = read_card(uri)
    card_uri = storage.join(uri, CARD_FILE)
    if not card.weights_sha256:
        raise ModelLoadError(f"{card_uri} has no weights_sha256: without it a truncated or swapped weights file "
                             f"cannot be told apart; save the model again with `resflow train` or save_model")
    expected = weights_bytes(card, card_uri)
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    try:
        data = storage.read_bytes(weights_uri, max_bytes=expected + SAFETENSORS_HEADER_BYTES)
    except FileNotFoundError as error:
        raise ModelLoadError(f"no {WEIGHTS_FILE} in {uri}") from error
    except ValueError as error:
        raise ModelLoadError(f"{weights_uri} is larger than the {expected:,} bytes of weights {CARD_FILE} "
                             f"describes: refused") from error
    pickled = _looks_pickled(data)
    if pickled:
        raise ModelLoadError(f"{weights_uri} is {pickled}, not safetensors; refusing to load it, since unpickling "
                             f"runs arbitrary code. Convert it where you trust it: "
                             f"safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')")
    if hashlib.sha256(data).hexdigest() != card.weights_sha256:
        raise ModelLoadError(f"{weights_uri} does not match the sha256 recorded in {CARD_FILE}: the folder is "
                             f"incomplete or was modified")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, Exception) as error:
        raise ModelLoadError(f"{weights_uri} is not a valid safetensors file: {error}") from error
    try:
        model = build_model(card.architecture, **card.config)
        model.load_state_dict(tensors, strict=True)
    except (ValueError, RuntimeError) as error:
        raise ModelLoadError(f"{weights_uri} does not fit the architecture in {CARD_FILE}: {error}") from error
    return model.to(map_location).eval(), card
