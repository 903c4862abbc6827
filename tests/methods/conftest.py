"""The ``loaded`` fixture: every model a method's ``run`` loads, captured with its starting weights."""

from __future__ import annotations

from typing import Any

import pytest

import alignment.models.load as model_loading
from tests.methods.helpers import Loaded


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> Loaded:
    """Wrap ``load_model`` (imported by each ``run`` at call time) so the test sees what a run trains."""
    box = Loaded()
    real = model_loading.load_model

    def load_and_keep(*args: Any, **kwargs: Any) -> Any:
        return box.keep(real(*args, **kwargs))

    monkeypatch.setattr(model_loading, "load_model", load_and_keep)
    return box
