"""Ray Train on local Ray with 2 CPU workers, data and checkpoints in SeaweedFS."""

import json
import os
import sys
import time
from dataclasses import dataclass, replace

import pytest

from pipeline import storage
from pipeline.config import TrainConfig, from_data, to_data, train_preset
from pipeline.degrade import Degradation, degrade_dataset
from pipeline.jobs import TrainJob
from pipeline.modelio import load_model
from pipeline.train import (
    TrainHooks,
    learning_rate_at,
    optimizer_from_tensors,
    optimizer_to_tensors,
)


def tiny_config(**overrides) -> TrainConfig:
    return replace(train_preset("tiny"), workers=2, cpus_per_worker=0.5, threads_per_worker=1, **overrides)


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
    assert card.training["config"]["workers"] == 2
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
        TrainConfig(patch_size=2)
    with pytest.raises(ValueError, match="fields are"):
        from pipeline.models import build_model

        config = TrainConfig(architecture_config={"layers": 3})
        build_model(config.architecture, **config.architecture_config)
    config = TrainConfig(learning_rate=1e-3, min_learning_rate=1e-5)
    assert learning_rate_at(0, config, 1) == pytest.approx(1e-3)
    assert learning_rate_at(1, config, 1) == pytest.approx(1e-5)
    assert learning_rate_at(0, config, 4) == pytest.approx(2e-3)  # sqrt(workers) scaling
    assert from_data(TrainConfig, json.loads(json.dumps(to_data(config)))) == config


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
