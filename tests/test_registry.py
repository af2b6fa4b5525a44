"""The model registry against SeaweedFS: versions, the champion pointer, promotion races."""

import threading

import pytest

from pipeline import registry
from pipeline.modelio import ModelLoadError
from tests.conftest import publish_version


def test_a_registry_without_a_champion_says_how_to_promote(trained_model, s3_prefix):
    models = s3_prefix + "/models"
    with pytest.raises(ModelLoadError, match="train one with `resflow train --registry"):
        registry.resolve(models)
    publish_version(trained_model, models, "v1")
    publish_version(trained_model, models, "v2")
    assert [card.version for card in registry.versions(models)] == ["v1", "v2"]
    with pytest.raises(ModelLoadError, match=f"resflow models promote {models} v2"):
        registry.resolve(models)
    registry.set_champion(models, "v1")
    assert registry.resolve(models) == registry.version_uri(models, "v1")


def test_promotions_decided_against_the_same_champion_cannot_both_win(trained_model, s3_prefix):
    models = s3_prefix + "/models"
    for version in ("a", "b", "c"):
        publish_version(trained_model, models, version)
    barrier, outcomes = threading.Barrier(2), {}

    def promote(version: str) -> None:
        barrier.wait()
        try:
            registry.set_champion(models, version, expected=None)  # both saw no champion
            outcomes[version] = "promoted"
        except registry.PromotionConflict:
            outcomes[version] = "conflict"

    threads = [threading.Thread(target=promote, args=(version,)) for version in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes.values()) == ["conflict", "promoted"]
    winner = next(version for version, outcome in outcomes.items() if outcome == "promoted")
    assert registry.champion(models)["version"] == winner
    with pytest.raises(registry.PromotionConflict, match=f"the champion of {models} is {winner}"):
        registry.set_champion(models, "c", expected=None)  # decided before the winner was promoted
    registry.set_champion(models, "c", expected=winner)
    assert registry.champion(models)["version"] == "c"
