import pickle

import pytest
import torch

from pipeline import modelio
from pipeline.config import TRAIN_PRESETS
from pipeline.models import MODELS, build_model

TINY = {"dncnn": {"depth": 4, "width": 8}, "resnet": {"blocks": 2, "width": 8, "unshuffle": 2}}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_forward_backward_odd_size(name, channels):
    torch.manual_seed(0)
    model = build_model(name, channels=channels, **TINY[name])
    x = torch.rand(2, channels, 37, 23, requires_grad=True)  # odd H x W
    y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_are_residual(name):
    """With the last layer zeroed the network returns its input: it learns only the correction."""
    model = build_model(name, **TINY[name]).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    x = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(model(x), x)


@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
def test_every_training_presets_architecture_builds(preset):
    config = TRAIN_PRESETS[preset]()
    model = build_model(config.model.architecture, **config.model.architecture_config)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet")
    with pytest.raises(ValueError, match="depth must be >= 3"):
        build_model("dncnn", depth=1)
    with pytest.raises(ValueError, match="fields are"):
        build_model("dncnn", layers=3)


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_round_trip_is_bit_exact(name, where, tmp_path, s3_prefix):
    root = str(tmp_path / "model") if where == "local" else s3_prefix + "/model"
    torch.manual_seed(1)
    model = build_model(name, **TINY[name])
    if name == "dncnn":  # give batch-norm buffers non-default values
        model.train()(torch.rand(4, 1, 16, 16))
    card = modelio.save_model(root, model, metrics={"val_psnr": 1.5}, degradation={"noise_sigma": 25})
    loaded, loaded_card = modelio.load_model(root)
    assert loaded_card.version == card.version and loaded_card.metrics == {"val_psnr": 1.5}
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key
    x = torch.rand(1, 1, 19, 21)
    assert torch.equal(model.eval()(x), loaded(x))


def test_pickle_named_safetensors_is_refused(tmp_path):
    model = build_model("dncnn", **TINY["dncnn"])
    modelio.save_model(str(tmp_path), model)
    torch.save(model.state_dict(), tmp_path / "model.safetensors")  # a zip of pickles
    with pytest.raises(modelio.ModelLoadError, match="refusing to load"):
        modelio.load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(modelio.ModelLoadError, match="pickle"):
        modelio.load_model(str(tmp_path))


def test_missing_or_tampered_model_folder(tmp_path):
    with pytest.raises(modelio.ModelLoadError, match="not a resflow model folder"):
        modelio.load_model(str(tmp_path))
    modelio.save_model(str(tmp_path), build_model("resnet", **TINY["resnet"]))
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # flip the last bytes of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(modelio.ModelLoadError, match="sha256"):
        modelio.load_model(str(tmp_path))


def test_safetensors_whose_header_length_looks_like_a_pickle_opcode_loads(tmp_path):
    # 1 block x 8 channels gives a safetensors header of 0x0280 bytes, so the file starts
    # 0x80 0x02 like a protocol-2 pickle; the pickle check once refused such a model.
    model = build_model("resnet", blocks=1, width=8)
    modelio.save_model(str(tmp_path), model, version="small")
    assert (tmp_path / "model.safetensors").read_bytes()[:2] == b"\x80\x02"
    _, card = modelio.load_model(str(tmp_path))
    assert card.version == "small"


def test_colour_presets_are_rgb_and_the_card_and_models_show_say_so(tmp_path, capsys):
    import json

    from pipeline.cli import main
    from pipeline.modelio import read_card, save_model

    for preset in ("cpu-color", "cpu-color-blind", "dncnn-color"):
        assert TRAIN_PRESETS[preset]().model.architecture_config["channels"] == 3, preset
    assert TRAIN_PRESETS["cpu"]().model.architecture_config.get("channels", 1) == 1
    assert TRAIN_PRESETS["cpu-color-blind"]().data.degradation.noise_sigma_range == (0.0, 55.0)
    for channels, word in ((3, "colour"), (1, "gray")):
        folder = str(tmp_path / word)
        save_model(folder, build_model("resnet", channels=channels, blocks=1, width=4))
        assert read_card(folder).channels == channels
        assert main(["models", "show", folder]) == 0
        assert capsys.readouterr().out.splitlines()[0].endswith(f"{word}{' (RGB)' if channels == 3 else ''} model, "
                                                                f"{channels} channel(s)")
        assert main(["models", "show", folder, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["channels"] == channels


def test_a_card_with_absurd_sizes_or_no_checksum_is_refused_before_any_layer_is_built(tmp_path, monkeypatch):
    import json

    modelio.save_model(str(tmp_path), build_model("resnet", **TINY["resnet"]))
    card_file = tmp_path / "model.json"
    card = json.loads(card_file.read_text())
    built = []
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters", lambda self: built.append(self.weight.device.type))
    card_file.write_text(json.dumps({**card, "config": {**card["config"], "blocks": 4000, "width": 2048}}))
    with pytest.raises(modelio.ModelLoadError, match="parameters, over the limit"):
        modelio.load_model(str(tmp_path))
    assert set(built) <= {"meta"}  # measured without memory: no real layer was allocated
    card_file.write_text(json.dumps({**card, "weights_sha256": ""}))
    with pytest.raises(modelio.ModelLoadError, match="no weights_sha256"):
        modelio.load_model(str(tmp_path))
    card_file.write_text(json.dumps(card))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0" * (2 << 20))  # far more bytes than the card's network holds
    with pytest.raises(modelio.ModelLoadError, match="larger than the"):
        modelio.load_model(str(tmp_path))


def test_a_noise_map_model_is_told_each_images_level_and_uses_it():
    """FFDNet's noise-level map: one more input plane. A model of either kind refuses the
    other's call, so a noise-map model never runs blind of its level by mistake."""
    torch.manual_seed(0)
    model = build_model("resnet", blocks=2, width=8, unshuffle=2, noise_map=True)
    torch.nn.init.normal_(model.tail.weight, std=0.1)  # the tail starts at zero: the identity, whatever the level
    x = torch.rand(2, 1, 15, 17)
    low, high = model(x, torch.tensor([5.0, 5.0]) / 255), model(x, torch.tensor([5.0, 50.0]) / 255)
    assert low.shape == x.shape
    assert torch.equal(low[0], high[0]) and not torch.allclose(low[1], high[1])  # each image its own level
    with pytest.raises(ValueError, match="needs each image's noise level"):
        model(x)
    with pytest.raises(ValueError, match="takes no noise level"):
        build_model("resnet", blocks=2, width=8)(x, torch.tensor([0.1, 0.1]))
