"""The local server with injected faults, for tests of client retries (test code only, not in ``alignment``).

``python -m tests.inference.fault_server --model M --port P [server options] [fault options]`` serves the app of
:mod:`alignment.inference.server` (through its :func:`~alignment.inference.server.main`) wrapped in
:class:`FaultInjector`. ``--fault-429 P`` (with ``Retry-After: --retry-after``), ``--fault-500 P`` and
``--fault-drop P`` (the connection is aborted without a response) hit a random fraction of chat requests;
``--fail-marker TEXT`` fails every request whose body contains TEXT (``--fail-marker-status``, 500 by default).
``GET /faults`` counts the faults injected, by kind (``429``, ``500``, ``drop``, ``marker``).

:data:`COMMAND` is the ``command`` to give :func:`~alignment.inference.server.running_server`; the repository root
must be on ``PYTHONPATH`` (``running_server`` puts it there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

COMMAND = (sys.executable, "-m", "tests.inference.fault_server")
"""The program that starts this server, for ``running_server(..., command=COMMAND)``."""


@dataclass
class FaultConfig:
    """Injected failures (tests of client retries); all off by default."""

    rate_429: float = 0.0
    """Fraction of chat requests answered 429 with a ``Retry-After`` header."""
    rate_500: float = 0.0
    """Fraction answered 500."""
    rate_drop: float = 0.0
    """Fraction whose connection is aborted without any response."""
    retry_after_s: float = 0.2
    """``Retry-After`` seconds sent with the 429s."""
    fail_marker: str | None = None
    """Requests whose body contains this text always fail, with ``fail_marker_status``."""
    fail_marker_status: int = 500
    """Status of the marked requests' failures (429 ones carry ``Retry-After`` too)."""
    seed: int = 0
    """Seed of the fault draws."""
    counts: dict[str, int] = field(default_factory=dict)
    """Faults injected so far, by kind (served at ``GET /faults``)."""


def _json_body(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def _error_body(message: str, kind: str, code: int) -> bytes:
    """An error in the OpenAI API's shape, as the server's own errors are."""
    return _json_body({"error": {"message": message, "type": kind, "param": None, "code": code}})


class FaultInjector:
    """ASGI middleware that fails a fraction of ``/v1/chat/completions`` requests (see :class:`FaultConfig`).

    It also answers ``GET /faults`` with :attr:`FaultConfig.counts`. Dropping a connection needs uvicorn's ``h11``
    protocol, which :func:`alignment.inference.server.main` runs.
    """

    def __init__(self, app: Any, faults: FaultConfig) -> None:
        self.app = app
        self.faults = faults
        self.rng = random.Random(faults.seed)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Pass the request on, answer ``GET /faults``, or answer a chat request with a drawn fault."""
        if scope["type"] == "http" and scope["path"] == "/faults" and scope["method"] == "GET":
            await _send(send, 200, _json_body(dict(self.faults.counts)))
            return
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        fault = self._draw(body)
        if fault is None:
            await self.app(scope, _replay(body), send)
            return
        self.faults.counts[fault] = self.faults.counts.get(fault, 0) + 1
        if fault == "drop":
            # uvicorn's receive is a bound method of the request cycle, which holds the socket's transport.
            receive.__self__.transport.abort()
            for _ in range(3):  # let connection_lost run, so uvicorn does not try to send a 500
                await asyncio.sleep(0)
            return
        status = {"429": 429, "500": 500}.get(fault, self.faults.fail_marker_status)
        headers = [(b"retry-after", str(self.faults.retry_after_s).encode())] if status == 429 else []
        await _send(send, status, _error_body(f"injected {fault}", "injected_fault", status), headers)

    def _draw(self, body: bytes) -> str | None:
        marker = self.faults.fail_marker
        if marker and marker.encode() in body:
            return "marker"
        r = self.rng.random()
        for kind, rate in (
            ("drop", self.faults.rate_drop),
            ("429", self.faults.rate_429),
            ("500", self.faults.rate_500),
        ):
            if r < rate:
                return kind
            r -= rate
        return None


async def _send(send: Any, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send a whole JSON response."""
    all_headers = [(b"content-type", b"application/json"), *headers]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes) -> Callable[[], Any]:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a disconnect never comes: the request is complete
        return {"type": "http.disconnect"}

    return receive


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.inference.fault_server",
        description="The local server with injected faults; other options go to alignment.inference.server.",
        allow_abbrev=False,
    )
    parser.add_argument("--fault-429", type=float, default=0.0, help="fraction of chat requests answered 429")
    parser.add_argument("--fault-500", type=float, default=0.0, help="fraction answered 500")
    parser.add_argument("--fault-drop", type=float, default=0.0, help="fraction whose connection is aborted")
    parser.add_argument("--retry-after", type=float, default=0.2, help="Retry-After seconds of injected 429s")
    parser.add_argument("--fail-marker", default=None, help="always fail requests containing this text")
    parser.add_argument("--fail-marker-status", type=int, default=500, help="status of the marked requests")
    parser.add_argument("--fault-seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the fault options, then serve through the production ``main`` with the app wrapped in the injector."""
    from alignment.inference.server import main as serve

    args, rest = _parser().parse_known_args(argv)
    faults = FaultConfig(
        rate_429=args.fault_429,
        rate_500=args.fault_500,
        rate_drop=args.fault_drop,
        retry_after_s=args.retry_after,
        fail_marker=args.fail_marker,
        fail_marker_status=args.fail_marker_status,
        seed=args.fault_seed,
    )
    serve(rest, app_wrapper=lambda app: FaultInjector(app, faults))


if __name__ == "__main__":
    main()
