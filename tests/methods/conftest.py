"""Fixtures that capture every model a method's ``run`` loads, with its starting weights."""

from __future__ import annotations

from typing import Any

import pytest

import alignment.models.load as model_loading
from alignment.models import seqcls as reward_models
from tests.methods.helpers import Loaded, trainable


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> Loaded:
    """Wrap ``load_model`` (imported by each ``run`` at call time) so the test sees what a run trains."""
    box = Loaded()
    real = model_loading.load_model

    def load_and_keep(*args: Any, **kwargs: Any) -> Any:
        return box.keep(real(*args, **kwargs))

    monkeypatch.setattr(model_loading, "load_model", load_and_keep)
    return box


@pytest.fixture
def models(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """``(model, starting trainable weights)`` for every sequence classifier a run loads (reward, classification)."""
    box: list[Any] = []
    real = reward_models.load_model_for_classification

    def load_and_keep(*args: Any, **kwargs: Any) -> Any:
        model = real(*args, **kwargs)
        box.append((model, trainable(model)))
        return model

    monkeypatch.setattr(reward_models, "load_model_for_classification", load_and_keep)
    return box
