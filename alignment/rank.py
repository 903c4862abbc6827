"""One rank of a multi-process run.

Usage: ``python -m alignment.rank CONFIG RUN_DIR [--name N] [--group G] [-- OVERRIDES]``.

Started by :func:`alignment.launch.ranks.spawn_ranks` (torch elastic sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). Loads the resolved config file (never re-composes), and runs the
same runner body as a single-process run in ``RUN_DIR``; only rank 0 writes the run files. A rank stopped by the
preemption signal (checkpoint saved, :class:`~alignment.training.checkpoint.PreemptedError`) exits with code 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from alignment.context import RunContext


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, load the resolved config, and run this rank's share of the training."""
    parser = argparse.ArgumentParser(prog="python -m alignment.rank", description=__doc__)
    parser.add_argument("config", type=Path, help="resolved config file (written by the launching process)")
    parser.add_argument("run_dir", type=Path, help="the run directory shared by all ranks")
    parser.add_argument("--name", default=None, help="tracker run name (default: the run directory's name)")
    parser.add_argument("--group", default=None, help="sweep group of the run")
    argv = sys.argv[1:] if argv is None else argv
    # After ``--``: the launch command's Hydra overrides, only recorded in environment.json.
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    from alignment.launch.ranks import finish_rank, global_rank
    from alignment.registry import load_resolved_config
    from alignment.runner import execute
    from alignment.training.checkpoint import PreemptedError

    logging.basicConfig(
        level=logging.INFO, format=f"[rank {global_rank()}] %(asctime)s %(name)s %(levelname)s %(message)s"
    )
    cfg = load_resolved_config(args.config)
    run_dir: Path = args.run_dir
    ctx = RunContext(run_dir, args.name or "_".join(run_dir.parts[-2:]), args.group)
    try:
        execute(cfg, ctx, overrides)
    except PreemptedError as stopped:
        # A clean stop: the checkpoint is saved and the launching task requeues the job. Exiting 0 keeps torch
        # elastic (max_restarts > 0) from restarting a rank group that is meant to end here.
        logging.getLogger(__name__).warning("%s; exiting cleanly for the requeue", stopped)
    finally:
        finish_rank()


def _exit_now() -> None:
    """Leave without the interpreter's teardown, everything written and the process group gone.

    A library's native thread can still abort the process there ("terminate called without an active exception",
    SIGABRT, seen once after a finished ZeRO-3 run), turning a finished run into a failed one.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    _exit_now()
