import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import RestoreSettings
from pipeline.images import encode_png
from pipeline.inference import ImageRestorer, ModelRunner, blend_ramp, tile_starts
from pipeline.modelio import save_model
from pipeline.models import build_model
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    model = build_model("dncnn", depth=5, width=8)
    model.train()(torch.rand(4, 1, 32, 32))  # non-trivial batch-norm statistics
    save_model(str(path), model)
    return str(path)


def test_tiles_cover_the_image_and_weights_never_vanish():
    for length in (100, 512, 513, 1500):
        starts = tile_starts(length, 256, 64)
        covered = np.zeros(length)
        for start in starts:
            end = min(start + 256, length)
            covered[start:end] += blend_ramp(end - start, 64, start == 0, end == length)
        assert covered.min() > 0.2


def test_tiled_equals_whole_image_within_one_level(model_dir):
    from pipeline.modelio import load_model

    model, _ = load_model(model_dir)
    rng = np.random.default_rng(0)
    image = rng.random((1, 300, 417)).astype(np.float32)
    whole = ModelRunner(model, RestoreSettings(tile=1024, tile_overlap=0)).run([image])[0]
    tiled = ModelRunner(model, RestoreSettings(tile=96, tile_overlap=32, batch_size=5)).run([image])[0]
    assert np.abs(whole - tiled).max() < 1 / 255


def test_batch_of_mixed_modes_and_sizes_keeps_each_row(model_dir):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (40, 52), dtype=np.uint8)
    rgba = rng.integers(0, 256, (33, 20, 4), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (24, 24), dtype=np.uint16)
    batch = {
        "image_id": np.array(["g", "bad", "rgba", "g16"], dtype=object),
        "image": np.array([encode_png(gray, "L"), b"junk", encode_png(rgba, "RGBA"), encode_png(gray16, "I;16")],
                          dtype=object),
        "label": np.array([1, 2, 3, 4]),
    }
    out = ImageRestorer(model_dir, RestoreSettings(tile=32, tile_overlap=8))(batch)
    assert list(out["status"]) == ["ok", "failed", "ok", "ok"]
    assert "cannot decode" in out["error"][1] and out["image"][1] is None
    assert list(out["label"]) == [1, 2, 3, 4] and len(set(out["model_version"])) == 1
    from pipeline.images import decode

    restored_rgba = decode(out["image"][2])
    assert restored_rgba.mode == "RGBA"
    np.testing.assert_array_equal(restored_rgba.pixels[:, :, 3], rgba[:, :, 3])  # alpha untouched
    assert decode(out["image"][3]).mode == "I;16" and decode(out["image"][0]).pixels.shape == (40, 52)


FAULTS_PER_CALL = """
import resource, sys, threading
import numpy as np, torch
from pipeline.modelio import load_model
from pipeline.config import RestoreSettings
from pipeline.inference import ModelRunner

torch.set_num_threads(1)
model, _ = load_model(sys.argv[1])
images = [np.random.default_rng(i).random((1, 256, 256), dtype=np.float32) for i in range(4)]
result = {}

def calls():  # on a thread other than the main one, as a Ray replica runs its calls
    runner = ModelRunner(model, RestoreSettings(batch_size=4))
    for _ in range(3):  # warm-up: the heap grows to the working set
        runner.run(images)
    rounds = []
    for _ in range(3):  # the best of three rounds: a one-off mapping elsewhere in the process is not the pattern
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            runner.run(images)
        rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    result["faults"] = min(rounds)
    result["kept"] = runner.keeps_freed_memory

thread = threading.Thread(target=calls)
thread.start()
thread.join()
print(result["kept"], result["faults"])
"""


def test_cpu_forward_passes_reuse_freed_activation_memory(model_dir):
    """Activations freed by one layer are reused by the next and by the next call instead of
    going back to the kernel and being faulted in again (inference.CPU_MALLOC_SETTINGS),
    also on a thread other than the main one. Fresh process: the settings are process-wide."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL, model_dir], capture_output=True, text=True,
                          check=True, cwd=str(Path(__file__).resolve().parents[1]))
    kept, faults_per_call = done.stdout.split()
    if kept != "True":
        pytest.skip("not glibc: the C library's allocator keeps its own policy")
    activation_pages = 4 * 8 * 256 * 256 * 4 / 4096  # one layer's output: 4 images, 8 channels, float32
    # glibc's defaults: ~3 activations' pages per call here (6,100 faults); kept: none
    assert float(faults_per_call) < 0.1 * activation_pages, faults_per_call


def test_io_threads_and_concurrent_calls_return_each_call_whole(model_dir):
    """How a GPU replica runs (pipeline/restore/replica.py): PNG work on several threads, two calls at once.
    Each call still returns its own rows, in order, equal to one thread's, and bad rows
    still fail alone."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.images import decode

    rng = np.random.default_rng(0)
    values = [encode_png(rng.integers(0, 256, (24 + i, 40), dtype=np.uint8), "L") for i in range(12)] + [b"junk"]
    batches = [{"image_id": np.array([f"{call}-{row}" for row in range(5)], dtype=object),
                "image": np.array([values[(call * 5 + row) % len(values)] for row in range(5)], dtype=object)}
               for call in range(8)]
    expected = [ImageRestorer(model_dir, RestoreSettings(threads=1))(batch) for batch in batches]
    threaded = ImageRestorer(model_dir, RestoreSettings(threads=1, io_threads=3))
    with ThreadPoolExecutor(2) as calls:
        results = list(calls.map(threaded, batches))
    assert threaded.io_pool is not None and len(results) == len(batches)
    for want, got in zip(expected, results):
        assert list(got["image_id"]) == list(want["image_id"])
        assert list(got["status"]) == list(want["status"])
        assert [error is None for error in got["error"]] == [error is None for error in want["error"]]
        for got_png, want_png in zip(got["image"], want["image"]):
            assert (got_png is None) == (want_png is None)
            if got_png is not None:
                assert np.array_equal(decode(got_png).pixels, decode(want_png).pixels)
    assert "failed" in [status for result in results for status in result["status"]]


# --- colour: the path each image takes ----------------------------------------------------------


def correlated_pattern(rng, size: int, block: int) -> np.ndarray:
    """A colour test pattern whose channels are one texture under a random tint: what one
    channel cannot tell about its noise, the other two can."""
    texture = np.kron(rng.random((size // block + 1, size // block + 1)), np.ones((block, block)))[:size, :size]
    return (0.15 + 0.7 * texture[:, :, None] * rng.uniform(0.7, 1.0, 3)).astype(np.float32)


def train_on_patterns(channels: int, steps: int = 100) -> torch.nn.Module:
    """A small DnCNN trained for seconds on correlated patterns (a gray one on their channels)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("dncnn", channels=channels, depth=4, width=16, batch_norm=False)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        clean = np.stack([correlated_pattern(rng, 32, 1 + 3 * (i % 2)) for i in range(16)]).transpose(0, 3, 1, 2)
        if channels == 1:
            clean = clean.reshape(-1, 1, 32, 32)[::3]  # as many gray patches per step as colour ones
        clean = torch.from_numpy(np.ascontiguousarray(clean))
        loss = torch.nn.functional.mse_loss(model(clean + torch.randn_like(clean) * 25 / 255), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def colour_model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("colour-model")
    save_model(str(path), train_on_patterns(channels=3))
    return str(path)


def _psnr8(clean: np.ndarray, test: np.ndarray) -> float:
    from pipeline.metrics import psnr

    return psnr(np.clip(np.rint(clean * 255), 0, 255), np.clip(np.rint(test * 255), 0, 255))


def test_colour_model_restores_rgb_jointly_better_than_the_per_channel_path(colour_model_dir):
    """The same training budget and data: the colour model sees the three noisy channels at
    once and beats a gray model restoring them one at a time by a wide margin."""
    from pipeline.inference import JOINT, PER_CHANNEL
    from pipeline.modelio import load_model

    colour, card = load_model(colour_model_dir)
    gray = train_on_patterns(channels=1)
    rng = np.random.default_rng(123)
    clean = correlated_pattern(rng, 96, 1)
    noisy = clean + rng.normal(0, 25 / 255, clean.shape).astype(np.float32)
    settings = RestoreSettings(bf16=False)
    joint_runner, gray_runner = ModelRunner(colour, settings), ModelRunner(gray, settings)
    assert card.channels == 3 and joint_runner.channel_path(3) == JOINT and gray_runner.channel_path(3) == PER_CHANNEL
    joint = joint_runner.restore_images([noisy])[0]
    per_channel = gray_runner.restore_images([noisy])[0]
    assert joint.shape == per_channel.shape == clean.shape
    noisy_psnr = _psnr8(clean, noisy)
    assert _psnr8(clean, per_channel) > noisy_psnr  # the gray model learned something too
    assert _psnr8(clean, joint) > _psnr8(clean, per_channel) + 1.5


def test_colour_model_keeps_each_rows_mode_gray_stays_gray_alpha_and_16_bit_survive(colour_model_dir):
    """One batch of gray, RGB, RGBA and 16-bit RGB rows through a colour model: every row
    restored in its own mode, the gray one through replicated channels, still gray and better."""
    from pipeline.images import decode

    rng = np.random.default_rng(7)
    gray_clean = correlated_pattern(rng, 64, 4)[:, :, 0]
    colour_clean = correlated_pattern(rng, 64, 1)

    def noisy(clean, top):
        return np.clip(np.rint((clean + rng.normal(0, 25 / 255, clean.shape)) * top), 0, top)

    gray = noisy(gray_clean, 255).astype(np.uint8)
    rgba = np.concatenate([noisy(colour_clean, 255), rng.integers(0, 256, (64, 64, 1))], axis=2).astype(np.uint8)
    rgb16 = noisy(colour_clean, 65535).astype(np.uint16)
    batch = {"image_id": np.array(["gray", "rgba", "rgb16"], dtype=object),
             "image": np.array([encode_png(gray, "L"), encode_png(rgba, "RGBA"), encode_png(rgb16, "RGB;16")],
                               dtype=object)}
    out = ImageRestorer(colour_model_dir, RestoreSettings(bf16=False))(batch)
    assert list(out["status"]) == ["ok", "ok", "ok"], list(out["error"])
    assert not out["per_channel"].any()  # a colour model never splits channels
    restored_gray, restored_rgba, restored_16 = (decode(png) for png in out["image"])
    assert restored_gray.mode == "L" and restored_gray.pixels.shape == (64, 64)
    assert _psnr8(gray_clean, restored_gray.pixels / 255) > _psnr8(gray_clean, gray / 255) + 0.5
    assert restored_rgba.mode == "RGBA"
    np.testing.assert_array_equal(restored_rgba.pixels[:, :, 3], rgba[:, :, 3])  # alpha untouched
    assert _psnr8(colour_clean, restored_rgba.pixels[:, :, :3] / 255) > _psnr8(colour_clean, rgba[:, :, :3] / 255) + 2
    assert restored_16.mode == "RGB;16" and restored_16.pixels.dtype == np.uint16
    assert len(np.unique(restored_16.pixels % 256)) > 200  # 16-bit values, not 8-bit ones scaled up
    assert _psnr8(colour_clean, restored_16.pixels / 65535) > _psnr8(colour_clean, rgb16 / 65535) + 2


def test_gray_model_on_colour_rows_flags_the_per_channel_path(model_dir):
    rng = np.random.default_rng(3)
    batch = {"image_id": np.array(["gray", "rgb", "bad"], dtype=object),
             "image": np.array([encode_png(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L"),
                                encode_png(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), "RGB"), b"junk"],
                               dtype=object)}
    out = ImageRestorer(model_dir, RestoreSettings())(batch)
    assert list(out["status"]) == ["ok", "ok", "failed"]
    assert list(out["per_channel"]) == [False, True, False]


def test_restored_pixels_are_the_networks_own_rounded(model_dir):
    """The whole restore path (decode, batching by shape, forward, rounding, PNG encode)
    against the network run by hand on one image at a time: identical pixels, or within
    one level where bf16 sums in another order. Fails if a codec, the batching or the
    rounding changes what the model produced."""
    from PIL import Image

    from pipeline.images import decode
    from pipeline.inference import native_bf16
    from pipeline.modelio import load_model

    rng = np.random.default_rng(1)
    shapes = [(48, 64), (64, 48), (48, 64), (37, 53), (48, 64)]
    pixels = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    batch = {"image_id": np.array([str(i) for i in range(len(pixels))], dtype=object),
             "image": np.array([encode_png(p, "L") for p in pixels], dtype=object)}
    model, _ = load_model(model_dir)
    model.eval()
    for settings in (RestoreSettings(), RestoreSettings(batch_size=3), RestoreSettings(bf16=False)):
        out = ImageRestorer(model_dir, settings)(batch)
        assert list(out["status"]) == ["ok"] * len(pixels)
        bf16 = settings.bf16 and native_bf16("cpu")
        for png, noisy in zip(out["image"], pixels):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                reference = model(torch.from_numpy(noisy.astype(np.float32) / 255)[None, None])[0, 0].float().numpy()
            want = np.clip(np.rint(reference * 255), 0, 255).astype(np.uint8)
            got = np.asarray(Image.open(io.BytesIO(png)))
            np.testing.assert_array_equal(got, decode(png).pixels)
            difference = np.abs(got.astype(int) - want.astype(int))
            assert difference.max() <= 1, settings
            assert (difference == 0).mean() > 0.99, settings


def test_a_noise_map_model_is_told_its_images_noise_on_every_tile(tmp_path):
    """The runner tells each image, on every tile and every channel path, its own noise
    sigma: the one restore estimated already where given, otherwise its own estimate; and
    restore passes the estimate it records."""
    from pipeline import inference
    from pipeline.degradations import protocol_noisy
    from pipeline.models import ResNet

    clean = np.asarray(Image.open(shared_data("Set12") / "01.png").convert("L"), np.float32)[:, :, None] / 255
    quiet, noisy = protocol_noisy(clean, 10), protocol_noisy(clean, 40)
    colour = np.concatenate([quiet, noisy[::-1], quiet[:, ::-1]], axis=2)  # (256, 256, 3)
    told: list[float] = []
    forward = ResNet.forward

    def spy(self, x, noise_level=None):
        told.extend((noise_level * 255).tolist())
        return forward(self, x, noise_level)

    settings = RestoreSettings(tile=128, tile_overlap=16)  # 9 tiles per 256 x 256 image
    gray_model = build_model("resnet", blocks=2, width=8, unshuffle=2, noise_map=True)
    colour_model = build_model("resnet", channels=3, blocks=2, width=8, unshuffle=2, noise_map=True)
    sigma = {name: inference.image_noise_sigma(image) for name, image in
             (("quiet", quiet), ("noisy", noisy), ("colour", colour))}
    assert abs(sigma["quiet"] - 10) < 1.5 and abs(sigma["noisy"] - 40) < 1.5
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ResNet, "forward", spy)
        ModelRunner(gray_model, settings).restore_images([quiet, colour, noisy])  # joint, per channel, joint
        assert told == pytest.approx([sigma["quiet"]] * 9 + [sigma["colour"]] * 27 + [sigma["noisy"]] * 9)
        told.clear()
        ModelRunner(colour_model, settings).restore_images([noisy, colour], noise_sigmas=[25.0, None])  # replicated
        assert told == pytest.approx([25.0] * 9 + [sigma["colour"]] * 9)

        save_model(str(tmp_path), gray_model)
        patch.setattr(inference, "_noise_sigma", lambda decoded: 33.0)  # what restore estimated and records
        told.clear()
        rows = {"image_id": np.array(["a"], dtype=object),
                "image": np.array([encode_png(np.clip(noisy[:, :, 0] * 255 + 0.5, 0, 255).astype(np.uint8), "L")],
                                  dtype=object)}
        out = ImageRestorer(str(tmp_path), RestoreSettings(tile=512, tile_overlap=0))(rows)
        assert list(out["status"]) == ["ok"] and out["noise_sigma"][0] == 33.0 and told == pytest.approx([33.0])
