"""GPU restoration: bf16 replicas on CUDA agree with fp32 on CPU, tiles still blend away,
and a Ray Data restore runs on GPU replicas. Marked `gpu`: skipped where torch sees no
CUDA device (CI), run on a GPU node with `pytest -m gpu`."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import metrics, storage
from pipeline.config import RestoreSettings
from pipeline.dataset import read_table
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.images import decode, to_float
from pipeline.inference import ImageRestorer, ModelRunner
from pipeline.ingest import ingest
from pipeline.jobs import RestoreJob
from pipeline.modelio import save_model
from pipeline.models import build_model
from pipeline.restore import restore_dataset
from tests.conftest import shared_data

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def paper_model(tmp_path_factory) -> str:
    """DnCNN-S's architecture (17 x 64, batch norm), seeded: agreement between devices does
    not depend on training, and the full depth is where bf16 error would accumulate."""
    torch.manual_seed(0)
    model = build_model("dncnn", depth=17, width=64, batch_norm=True).eval()
    path = tmp_path_factory.mktemp("gpu-model") / "model"
    save_model(str(path), model)
    return str(path)


def noisy_bsd68(count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    clean = [to_float(decode(path.read_bytes()).pixels, "L")[0].transpose(2, 0, 1)
             for path in sorted(shared_data("BSD68").glob("*.png"))[:count]]
    noisy = [np.clip(image + rng.normal(0, 25 / 255, image.shape), 0, 1).astype(np.float32) for image in clean]
    return clean, noisy


def test_bf16_on_gpu_restores_as_well_as_fp32_on_cpu(paper_model):
    from pipeline.modelio import load_model

    clean, noisy = noisy_bsd68(4)
    model, _ = load_model(paper_model)
    on_cpu = ModelRunner(model, RestoreSettings(batch_size=4)).run(noisy)
    model, _ = load_model(paper_model)
    on_gpu = ModelRunner(model, RestoreSettings(batch_size=4, device="cuda", bf16=True)).run(noisy)
    for cpu, gpu, truth in zip(on_cpu, on_gpu, clean):
        print(f"bf16 vs fp32: mean |diff| {np.abs(gpu - cpu).mean():.2e}, max {np.abs(gpu - cpu).max():.2e}; PSNR "
              f"{metrics.psnr(truth, gpu, data_range=1.0):.3f} vs {metrics.psnr(truth, cpu, data_range=1.0):.3f} dB")
        assert gpu.shape == cpu.shape and gpu.dtype == np.float32
        assert np.abs(gpu - cpu).mean() < 1 / 255
        assert metrics.psnr(truth, gpu, data_range=1.0) == pytest.approx(metrics.psnr(truth, cpu, data_range=1.0), abs=0.05)


def test_sure_on_gpu_matches_the_cpu_float32_estimate(paper_model):
    """SURE's divergence is a finite difference: TF32 convolutions would blur it, so on CUDA
    sure_mse turns them off and agrees with the CPU's float32 estimate."""
    from pipeline.modelio import load_model

    _, noisy = noisy_bsd68(1)
    image = torch.from_numpy(noisy[0])[None]
    probe = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    model, _ = load_model(paper_model)
    on_cpu = metrics.sure_mse(model.eval(), image, 25 / 255, probe)
    on_gpu = metrics.sure_mse(model.cuda().eval(), image.cuda(), 25 / 255, probe.cuda())
    assert on_gpu == pytest.approx(on_cpu, rel=1e-3)


def test_tiled_restore_on_gpu_equals_whole_image(paper_model):
    from pipeline.modelio import load_model

    _, noisy = noisy_bsd68(2)
    model, _ = load_model(paper_model)
    settings = dict(device="cuda", bf16=False)  # fp32: the comparison is about blending, not precision
    whole = ModelRunner(model, RestoreSettings(tile=1024, tile_overlap=0, **settings)).run(noisy)
    tiled = ModelRunner(model, RestoreSettings(tile=160, tile_overlap=64, batch_size=8, **settings)).run(noisy)
    for a, b in zip(whole, tiled):
        assert np.abs(a - b).max() < 1 / 255


def test_replica_with_io_threads_and_two_calls_at_once_matches_one_thread(paper_model):
    """A GPU replica decodes and encodes on several threads and runs two calls at once:
    each call's rows come back whole and in order, as with one thread."""
    from concurrent.futures import ThreadPoolExecutor

    values = [path.read_bytes() for path in sorted(shared_data("BSD68").glob("*.png"))[:16]]
    batches = [{"image_id": np.array([f"{i}-{j}" for j in range(8)], dtype=object),
                "image": np.array(values[8 * (i % 2) : 8 * (i % 2) + 8], dtype=object)} for i in range(6)]
    settings = RestoreSettings(device="cuda", batch_size=8)
    single = ImageRestorer(paper_model, settings)
    expected = [single(batch) for batch in batches]
    threaded = ImageRestorer(paper_model, RestoreSettings(device="cuda", batch_size=8, io_threads=4))
    with ThreadPoolExecutor(2) as calls:
        results = list(calls.map(threaded, batches))
    for want, got in zip(expected, results):
        assert list(got["image_id"]) == list(want["image_id"])
        assert list(got["status"]) == ["ok"] * 8
        for got_png, want_png in zip(got["image"], want["image"]):  # cuDNN may pick another kernel: within a level
            assert np.abs(decode(got_png).pixels.astype(int) - decode(want_png).pixels.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def gpu_ray():
    """Local Ray as `resflow restore --gpu` starts it (no dashboard), or the session's."""
    import ray

    from pipeline import raycluster

    started = not ray.is_initialized()
    raycluster.connect(dashboard=False)
    yield
    if started:
        ray.shutdown()


def test_restore_dataset_on_gpu_replicas(gpu_ray, paper_model, tmp_path):
    """Local files (storage is the CPU tests' subject; S3 works the same through storage.py)."""
    images, root = tmp_path / "images", str(tmp_path / "data")
    images.mkdir()
    for path in sorted(shared_data("BSD68").glob("*.png"))[:24]:
        (images / path.name).write_bytes(path.read_bytes())
    ingest(str(images), root + "/clean", rows_per_file=8, progress=False)
    degrade_dataset(root + "/clean", root + "/noisy", Degradation(noise_sigma=25), progress=False)
    report = restore_dataset(RestoreJob(input=root + "/noisy", output=root + "/out", model=paper_model, use_gpu=True,
                                        stall_timeout_s=300))
    assert (report.files_restored, report.images_ok, report.images_failed) == (3, 24, 0)
    out = pa.concat_tables([read_table(info.uri) for info in storage.list_files(root + "/out")])
    source = pa.concat_tables([read_table(info.uri) for info in storage.list_files(root + "/noisy")])
    assert out["image_id"].to_pylist() == source["image_id"].to_pylist()
    # the same model on CPU, in this process: the GPU replicas' output agrees within bf16's error
    cpu = ImageRestorer(paper_model, RestoreSettings())({"image": source["image"].to_numpy(zero_copy_only=False)})
    for gpu_png, cpu_png in zip(out["image"].to_pylist(), cpu["image"]):
        gpu_pixels, cpu_pixels = decode(gpu_png).pixels.astype(np.float32), decode(cpu_png).pixels.astype(np.float32)
        assert np.abs(gpu_pixels - cpu_pixels).mean() < 1.0  # grey levels


def test_peak_device_memory_is_bounded_by_the_tile_not_the_image(paper_model):
    """A 2048-pixel image fills one call of 16 tiles; a 6144-pixel one needs nine such
    calls, never a larger one: the device holds a call's tiles, whatever the image's size."""
    from pipeline.modelio import load_model

    model, _ = load_model(paper_model)
    runner = ModelRunner(model, RestoreSettings(device="cuda", batch_size=16, tile=512, tile_overlap=64))
    peaks = []
    for side in (2048, 6144):
        image = np.random.default_rng(side).random((side, side, 1), dtype=np.float32)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner.restore_images([image])
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
    assert peaks[1] <= 1.1 * peaks[0], peaks
