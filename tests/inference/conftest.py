"""A second local server that injects faults, shared by the inference tests, and a JSON GET helper."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FAIL_MARKER = "ALWAYS-FAILS"
RETRY_AFTER_S = 0.05


def get(base_url: str, path: str) -> Any:
    """GET a JSON endpoint of a local server given its ``.../v1`` base URL (``/health``, ``/faults``…)."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + path, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="session")
def faulty_server(tiny_random_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny model behind a server that injects faults; yields its base URL.

    15% of chat requests get 429 (``Retry-After: 0.05``), 10% get 500, 10% have their connection dropped, and
    every request containing :data:`FAIL_MARKER` is rate-limited. The faults are test code
    (:mod:`tests.inference.fault_server`) around the production app, not options of the production server.
    """
    from alignment.inference.server import running_server
    from tests.inference.fault_server import COMMAND

    log_path: Path = tmp_path_factory.mktemp("faulty_server") / "server.log"
    args = [
        *("--threads", "1"),
        *("--fault-429", "0.15", "--fault-500", "0.1", "--fault-drop", "0.1"),
        *("--retry-after", str(RETRY_AFTER_S), "--fail-marker", FAIL_MARKER, "--fail-marker-status", "429"),
    ]
    with running_server("embedded:tiny-random-llama", extra_args=args, log_path=log_path, command=COMMAND) as base_url:
        yield base_url
