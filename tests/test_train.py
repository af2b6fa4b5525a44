"""Ray Train on local Ray with 2 CPU workers, data and checkpoints in SeaweedFS."""

import json
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import pytest

from pipeline import storage
from pipeline.dataset import read_table
from pipeline.config import TrainConfig, from_data, to_data, train_config, train_preset
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.jobs import TrainJob
from pipeline.modelio import load_model
from tests.conftest import shared_data
from pipeline.train import (
    TrainHooks,
    learning_rate_at,
    optimizer_from_tensors,
    optimizer_to_tensors,
)


def tiny_config(**overrides) -> TrainConfig:
    return train_preset("tiny", workers=2, cpus_per_worker=0.5, threads_per_worker=1, **overrides)


def train(data: str, val_data: str, registry: str, config: TrainConfig, run_name: str | None = None, hooks=None):
    from pipeline import train as training

    return training.train(TrainJob(data=data, val_data=val_data, registry=registry, config=config, run_name=run_name),
                          hooks=hooks)


@dataclass
class CrashOnce:
    """A real worker death in the middle of `epoch`, once per run: the last rank exits after
    its third step unless `marker` exists (the restarted group must get past it). It waits
    until the controller has registered the previous epoch's checkpoint (its snapshot file
    is in `runs`): a report still in flight when a worker dies is lost, and on a fast
    machine the crash could otherwise outrun it and test a restart from scratch instead."""

    epoch: int
    marker: str
    runs: str

    def __call__(self, epoch: int, step: int, rank: int, world: int) -> None:
        if epoch == self.epoch and rank == world - 1 and step == 3 and not storage.exists(self.marker):
            deadline = time.monotonic() + 120
            while not storage.list_files(self.runs, suffixes=("checkpoint_manager_snapshot.json",)):
                assert time.monotonic() < deadline, "the controller never registered a checkpoint"
                time.sleep(0.2)
            storage.write_bytes(self.marker, b"injected")
            print(f"fault injection: worker {rank} exits in the middle of epoch {epoch}", flush=True)
            os._exit(1)


def checkpoints(run_uri: str) -> list[str]:
    return sorted({info.uri.split("/")[-2] for info in storage.list_files(run_uri, suffixes=("model.json",))
                   if "/checkpoint_" in info.uri})


def test_two_workers_train_checkpoint_and_publish(ray_local, train400_small, s3_prefix):
    result = train(train400_small + "/train", train400_small + "/val", s3_prefix + "/models", tiny_config())
    assert result.metrics["val_psnr"] > result.metrics["val_noisy_psnr"] + 3  # learned to denoise
    assert len(checkpoints(result.checkpoint_uri)) == 3  # one per epoch, keep 3
    model, card = load_model(result.model_uri)
    assert card.version == result.version and card.degradation["noise_sigma"] == 25
    assert card.data_fingerprint and card.metrics["val_psnr"] == pytest.approx(result.metrics["val_psnr"])
    assert card.training["config"]["scaling"]["workers"] == 2
    assert [row["epoch"] for row in result.history] == [1, 2, 3]


def test_killed_worker_resumes_from_checkpoint(ray_local, train400_small, s3_prefix):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import the tests
    hooks = TrainHooks(after_step=CrashOnce(epoch=2, marker=s3_prefix + "/fault_injected", runs=s3_prefix + "/models/_runs"))
    result = train(train400_small + "/train", train400_small + "/val", s3_prefix + "/models", tiny_config(), hooks=hooks)
    last = result.history[-1]
    assert last["restarts"] == 1 and last["resumed_from"] == 1  # restarted after epoch 1's checkpoint
    assert last["epoch"] == 3


def test_rerun_with_the_same_name_resumes_on_paired_data(ray_local, train400_small, s3_prefix):
    """Paired data (image degraded, target clean) as `resflow degrade` writes it."""
    for part in ("train", "val"):
        degrade_dataset(f"{train400_small}/{part}", f"{s3_prefix}/{part}", Degradation(noise_sigma=25),
                        seed_per_image=True, progress=False)
    first = train(s3_prefix + "/train", s3_prefix + "/val", s3_prefix + "/models", tiny_config(epochs=1),
                  run_name="resume-me")
    assert first.history[-1]["epoch"] == 1
    second = train(s3_prefix + "/train", s3_prefix + "/val", s3_prefix + "/models", tiny_config(epochs=2),
                   run_name="resume-me")
    assert second.history[-1]["epoch"] == 2 and second.history[-1]["resumed_from"] == 1
    _, card = load_model(second.model_uri)
    assert card.training["paired"] is True
    assert second.metrics["val_psnr"] > second.metrics["val_noisy_psnr"]


def test_parquet_footers_are_read_by_a_small_pool(ray_local, train400_small):
    """Ray Data's default is 32 footer-reading actors per read, each its own process: on a
    small node that storm delays the first batch by seconds. resflow sizes it to the cluster."""
    import ray
    from ray.util.state import list_actors

    from pipeline import raycluster
    from pipeline.train import read_image_dataset

    def footer_readers() -> int:
        return len(list_actors(filters=[("class_name", "=", "FooterReader")], limit=10_000,
                               raise_on_missing_output=False))

    before = footer_readers()
    assert read_image_dataset(storage.list_files(train400_small + "/val"), ["image_id"]).take_all()
    allowed = raycluster.footer_readers(ray.cluster_resources())
    assert 1 <= footer_readers() - before <= allowed


def test_config_validation_and_schedule():
    with pytest.raises(ValueError, match="patch_size"):
        train_config(patch_size=2)
    with pytest.raises(ValueError, match="self-supervised"):
        train_config(self_supervised=True, balance_noise_levels=True)
    with pytest.raises(ValueError, match="fields are"):
        from pipeline.models import build_model

        config = train_config(architecture_config={"layers": 3})
        build_model(config.model.architecture, **config.model.architecture_config)
    config = train_config(learning_rate=1e-3, min_learning_rate=1e-5)
    assert learning_rate_at(0, config, 1) == pytest.approx(1e-3)
    assert learning_rate_at(1, config, 1) == pytest.approx(1e-5)
    assert learning_rate_at(0, config, 4) == pytest.approx(2e-3)  # sqrt(workers) scaling
    assert from_data(TrainConfig, json.loads(json.dumps(to_data(config)))) == config


def test_the_schedule_moves_within_an_epoch():
    """Warm-up is a share of the schedule: with epochs as the budget, it must rise within
    the first epoch, not hold the floor for all of it."""
    import torch

    from pipeline.train import Worker

    config = train_config(epochs=10, warmup=0.05, learning_rate=1e-3, min_learning_rate=1e-5)
    network = torch.nn.Linear(2, 2)
    worker = Worker(config, network, network, torch.optim.Adam(network.parameters()), torch.device("cpu"), 0, 1,
                    steps_per_epoch=100)
    rates = []
    for step in (0, 25, 50, 100):
        worker.step = step
        rates.append(worker.set_learning_rate(epoch=1))
    assert rates[0] == pytest.approx(1e-5) and rates[1] == pytest.approx((1e-5 + 1e-3) / 2, rel=0.01)
    assert rates[2] == pytest.approx(1e-3) and rates[3] < rates[2]  # warm at half an epoch, then annealing


def test_optimizer_state_round_trips_without_pickle():
    import torch

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(4, 3)).sum().backward()
    optimizer.step()
    tensors, meta = optimizer_to_tensors(optimizer)
    fresh = torch.optim.Adam(model.parameters())
    optimizer_from_tensors(fresh, tensors, json.loads(json.dumps(meta)))
    for a, b in zip(optimizer.state.values(), fresh.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in a)


@dataclass
class ForgetAtEpoch:
    """Zero the network's weights before `epoch` is validated: a residual network then
    returns its input, a checkpoint far worse than the ones before it."""

    epoch: int

    def __call__(self, epoch: int, network) -> None:
        import torch

        if epoch == self.epoch:
            with torch.no_grad():
                for parameter in network.parameters():
                    parameter.zero_()


def test_self_supervised_learns_from_noisy_images_alone(ray_local, train400_small, s3_prefix):
    """Neighbor2Neighbor on data with no target column and no clean images anywhere: the
    validation set is noisy-only too, and SURE's reference-free estimate picks the checkpoint:
    not the last one here, whose weights were zeroed (the input returned unchanged). The
    published model beats the noisy input on held-out images scored against their originals."""
    from pipeline.evaluate import evaluate
    from pipeline.jobs import EvaluateJob

    for part in ("train", "val"):
        degrade_dataset(f"{train400_small}/{part}", f"{s3_prefix}/{part}", Degradation(noise_sigma=25),
                        seed_per_image=True, progress=False, keep_target=False)
    assert "target" not in read_table(storage.list_files(s3_prefix + "/train")[0].uri).column_names
    result = train(s3_prefix + "/train", s3_prefix + "/val", s3_prefix + "/models",
                   tiny_config(self_supervised=True, epochs=4), hooks=TrainHooks(before_validation=ForgetAtEpoch(4)))
    assert "val_psnr" not in result.metrics
    for key in ("val_n2n_psnr", "val_sure_psnr"):  # the reference-free scores rise as the model learns
        signal = [row[key] for row in result.history[:3]]
        assert max(signal[1:]) > signal[0], (key, signal)
    sure = {row["epoch"]: row["val_sure_psnr"] for row in result.history}
    assert sure[4] < max(sure.values()) - 1  # the zeroed network: SURE sees it is no denoiser
    val_scores = {row["epoch"]: row["val_score"] for row in result.history}  # SURE over the last 3 epochs
    assert val_scores == pytest.approx({epoch: np.mean([sure[e] for e in range(max(1, epoch - 2), epoch + 1)])
                                        for epoch in sure})
    assert result.metrics["epoch"] == max(val_scores, key=val_scores.get) < 4
    assert result.metrics["val_score"] == max(val_scores.values())
    _, card = load_model(result.model_uri)
    assert card.training["kinds"] == {"train": "noisy", "val": "noisy"}
    scores = evaluate(EvaluateJob(model=result.model_uri, data=train400_small + "/val", noise_sigma=25)).summary()
    print("self-supervised tiny:", scores["input_psnr"], "->", scores["output_psnr"])
    assert scores["output_psnr"] > scores["input_psnr"] + 2, scores


def test_validation_scores_a_paired_set_as_pairs_and_keeps_every_epoch(ray_local, train400_small, s3_prefix):
    """Clean training data, paired validation data: the validation input is the stored noisy
    image, not noise added on top of it (the noisy PSNR is the pairs' own, about 20.4 dB at
    sigma 25, not about 17.5). Every epoch's metrics are kept with the run and in the card."""
    import numpy as np

    from pipeline.images import decode
    from pipeline.metrics import psnr
    from pipeline.train import HISTORY_FILE, read_history

    degrade_dataset(f"{train400_small}/val", f"{s3_prefix}/val", Degradation(noise_sigma=25),
                    seed_per_image=True, progress=False)
    rows = read_table(storage.list_files(s3_prefix + "/val")[0].uri).to_pylist()
    pairs_psnr = float(np.mean([psnr(decode(row["target"]).pixels, decode(row["image"]).pixels, 255) for row in rows]))
    result = train(train400_small + "/train", s3_prefix + "/val", s3_prefix + "/models", tiny_config(epochs=2))
    assert result.history[-1]["val_noisy_psnr"] == pytest.approx(pairs_psnr, abs=0.05)
    _, card = load_model(result.model_uri)
    assert card.training["kinds"] == {"train": "clean", "val": "paired"}
    kept = read_history(storage.join(result.checkpoint_uri, HISTORY_FILE))
    assert [row["epoch"] for row in kept] == [1, 2] == [row["epoch"] for row in card.training["history"]]
    assert all(row["loss"] > 0 and row["val_psnr"] > 0 for row in kept)


def test_blind_training_draws_a_sigma_per_patch():
    import numpy as np

    from pipeline.config import train_preset
    from pipeline.contract import DecodeLimits
    from pipeline.images import encode_png
    from pipeline.train import CLEAN, sample_patches

    config = train_preset("cpu-blind", patches_per_image=24)
    flat = np.full((96, 96), 128, np.uint8)  # no texture: what a patch's std measures is its noise
    batch = {"image": [encode_png(flat, "L")], "image_id": ["flat"]}
    pairs = sample_patches(batch, config, 1, CLEAN, np.random.default_rng(0), np.random.RandomState(0), DecodeLimits())
    sigmas = [float(np.std(source - target)) * 255 for source, target, _ in pairs]
    assert len(pairs) == 24 and min(sigmas) >= 0 and max(sigmas) <= 57
    assert max(sigmas) - min(sigmas) > 20  # not one sigma for the whole image
    assert len({round(sigma) for sigma in sigmas}) > 12
    # Each patch knows the sigma drawn for it (what a noise-map model is told): a 50 x 50
    # patch's noise measures it to about 2%.
    for measured, patch in zip(sigmas, pairs):
        assert abs(measured - patch.noise_level * 255) < 0.06 * measured + 0.5


def test_the_balanced_loss_weighs_each_patch_by_its_noise():
    """Two patches at sigma 5 and 50, each restored to a tenth of its noise: the balanced loss
    weighs them by 25/sigma, whatever else is in the batch. A clean patch weighs as the
    floor's sigma. The config picks the loss."""
    import torch
    import torch.nn.functional as F

    from pipeline.train import balanced_mse, supervised_loss

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 32, 32, generator=generator)
    noise = torch.randn(2, 1, 32, 32, generator=generator)
    noise = noise / noise.flatten(1).pow(2).mean(1).sqrt().view(2, 1, 1, 1) * torch.tensor([5.0, 50.0]).view(2, 1, 1, 1) / 255
    source, output = target + noise, target + noise / 10
    errors = (noise / 10).flatten(1).pow(2).mean(1)
    weights = torch.tensor([25 / 5, 25 / 50])
    assert balanced_mse(output, target, source).item() == pytest.approx(float((errors * weights).mean()), rel=1e-4)
    assert balanced_mse(output[1:], target[1:], source[1:]).item() == pytest.approx(float(errors[1] / 2), rel=1e-4)
    source[0] = target[0]  # a clean patch: its weight is the floor's, 25/5, not infinite
    output[0] = target[0] + 0.01
    errors[0] = 1e-4
    assert balanced_mse(output, target, source).item() == pytest.approx(float((errors * weights).mean()), rel=1e-4)
    plain, balanced = (supervised_loss(train_preset("cpu-blind", balance_noise_levels=flag), output, target, source).item()
                       for flag in (False, True))
    assert plain == pytest.approx(F.mse_loss(output, target).item())
    assert balanced == pytest.approx(balanced_mse(output, target, source).item())


def test_neighbour_subsampling_picks_adjacent_pixels_of_each_cell():
    import torch

    from pipeline.train import neighbour_masks, neighbour_subsample

    height, width = 8, 12
    coordinates = torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width)
    first, second = neighbour_subsample(coordinates, neighbour_masks((1, 1, height, width), torch.Generator().manual_seed(0)))
    assert first.shape == second.shape == (1, 1, height // 2, width // 2)
    for a, b in zip(first.flatten().tolist(), second.flatten().tolist()):
        (ya, xa), (yb, xb) = divmod(int(a), width), divmod(int(b), width)
        assert (ya // 2, xa // 2) == (yb // 2, xb // 2)  # the same 2x2 cell
        assert abs(ya - yb) + abs(xa - xb) == 1  # sharing a side


def test_self_supervised_trains_a_colour_model_on_noisy_colour_photos_alone(ray_local, s3_prefix, tmp_path):
    """A user with only noisy colour photographs: Neighbor2Neighbor on noisy-only RGB data
    (noise per channel, no target anywhere) trains a colour model that beats the noisy
    input on held-out colour images scored against their clean originals."""
    from pipeline.evaluate import evaluate
    from pipeline.ingest import ingest
    from pipeline.jobs import EvaluateJob

    files = sorted(shared_data("CBSD432").glob("*.jpg"))[:14]
    for index, path in enumerate(files):
        part = tmp_path / ("val" if index >= 12 else "train")
        part.mkdir(exist_ok=True)
        (part / path.name).write_bytes(path.read_bytes())
    for part in ("train", "val"):
        ingest(str(tmp_path / part), f"{s3_prefix}/clean-{part}", rows_per_file=6, progress=False)
        degrade_dataset(f"{s3_prefix}/clean-{part}", f"{s3_prefix}/{part}", Degradation(noise_sigma=25),
                        seed_per_image=True, progress=False, keep_target=False)
    config = tiny_config(self_supervised=True, epochs=4, patches_per_image=128,
                         architecture_config={**train_preset("tiny").model.architecture_config, "channels": 3})
    result = train(s3_prefix + "/train", s3_prefix + "/val", s3_prefix + "/models", config)
    _, card = load_model(result.model_uri)
    assert card.channels == 3 and card.training["kinds"] == {"train": "noisy", "val": "noisy"}
    scores = evaluate(EvaluateJob(model=result.model_uri, data=s3_prefix + "/clean-val", noise_sigma=25)).summary()
    print("self-supervised colour tiny:", scores["input_psnr"], "->", scores["output_psnr"])  # 20.40 -> 22.76 here
    assert scores["output_psnr"] > scores["input_psnr"] + 1.5, scores


def test_train_config_groups_settings_by_concern_and_takes_any_field_by_name():
    """Settings are grouped (model, data, optimiser, checkpoints, scaling); a field is named
    flat wherever users name it (flags, flow parameters, presets), and names are unique."""
    import dataclasses

    from pipeline.config import setting_names, with_settings

    groups = [item.name for item in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(item.default)]
    assert groups == ["model", "data", "optimiser", "checkpoints", "scaling"]
    names = [inner.name for group in groups for inner in dataclasses.fields(getattr(TrainConfig(), group))]
    assert len(names) == len(set(names)) and setting_names(TrainConfig()) == set(names) | {"seed"}
    config = train_preset("cpu", learning_rate=5e-4, workers=2, keep_checkpoints=7, patch_size=64, seed=3)
    assert (config.optimiser.learning_rate, config.scaling.workers, config.checkpoints.keep_checkpoints,
            config.data.patch_size, config.seed) == (5e-4, 2, 7, 64, 3)
    assert config.model == train_preset("cpu").model and config.optimiser.warmup == train_preset("cpu").optimiser.warmup
    assert with_settings(config, workers=None) == config  # None leaves the preset's choice
    whole_and_field = with_settings(config, data=replace(config.data, patch_size=32), batch_size=8)
    assert (whole_and_field.data.patch_size, whole_and_field.data.batch_size) == (32, 8)
    with pytest.raises(ValueError, match=r"unknown TrainConfig setting\(s\) \['learning_rat'\]; known: .*learning_rate"):
        train_preset("cpu", learning_rat=1e-3)
    with pytest.raises(ValueError, match="OptimiserSettings: warmup"):
        train_config(warmup=1.5)


def test_a_noise_map_model_trains_on_the_drawn_levels_and_is_refused_where_none_is_known(ray_local, train400_small,
                                                                                          s3_prefix):
    from pipeline.models import takes_noise_level
    from pipeline.train import check_noise_map

    blind = Degradation(noise_sigma=None, noise_sigma_range=(0.0, 55.0))
    config = tiny_config(epochs=2, degradation=blind,
                         architecture_config={**train_preset("tiny").model.architecture_config, "noise_map": True})
    result = train(train400_small + "/train", train400_small + "/val", s3_prefix + "/models", config)
    model, card = load_model(result.model_uri)
    assert takes_noise_level(model) and card.config["noise_map"]
    # Validated as restore runs it: told each image's estimated level, not the one drawn.
    assert result.metrics["val_psnr"] > result.metrics["val_noisy_psnr"] + 2, result.metrics

    for kind, overrides in (("paired", {}), ("clean", {"self_supervised": True}),
                            ("clean", {"degradation": Degradation(noise_sigma=25, jpeg_quality=80)}),
                            ("clean", {"degradation": Degradation(noise_sigma=None, blur_sigma=1.0)})):
        with pytest.raises(ValueError, match="noise-map model"):
            check_noise_map(replace(config, data=replace(config.data, **overrides)), kind)
    with pytest.raises(ValueError, match="validated against references"):
        check_noise_map(config, "clean", "noisy")
    check_noise_map(config, "clean", "paired")


def test_each_patch_brings_its_own_level_into_the_step_batch():
    import torch

    from pipeline.train import Patch, patch_batch

    patches = [Patch(np.full((1, 4, 4), i, np.float32), np.zeros((1, 4, 4), np.float32), i / 255) for i in range(5)]
    source, target, levels = patch_batch(patches[::-1], torch.device("cpu"), with_levels=True)
    assert source.shape == (5, 1, 4, 4) and target.shape == (5, 1, 4, 4)
    assert levels[0].tolist() == pytest.approx([i / 255 for i in range(4, -1, -1)])
    assert torch.allclose(source[:, 0, 0, 0], levels[0] * 255)  # each level rides with its own patch
    assert patch_batch(patches, torch.device("cpu"), with_levels=False)[2] == ()
