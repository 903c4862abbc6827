"""Everything around a method's ``run``: the run directory, seeding, trackers, and the final metrics.

The run directory (Hydra's job output dir) receives ``config.yaml`` (the resolved config, secrets redacted),
``environment.json`` (package versions, git revision, command line), ``metrics.jsonl``, ``results.json``,
``generations/`` and the trained ``model/``. Hydra's own ``.hydra/`` copy is disabled in ``conf/config.yaml``
because it would store overrides unredacted.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from alignment.config import RunConfig
from alignment.context import RunContext
from alignment.loggers import close_trackers, open_trackers
from alignment.methods import METHODS

log = logging.getLogger(__name__)

REDACTED = "***"
_SECRET_KEY = re.compile(r"(api_?key|secret|password|passwd|access_?token|auth_?token|hf_?token|^token$)", re.I)
_SECRET_VALUE = re.compile(r"^(sk-|hf_|ghp_|github_pat_|xox[bp]-)[A-Za-z0-9_\-]{8,}")
_PACKAGES = (
    "effective-alignment",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "hydra-core",
    "omegaconf",
    "wandb",
    "clearml",
    "tensorboard",
)


def redact(value: Any, key: str = "") -> Any:
    """Copy of a config tree with secret-looking keys and values replaced by ``***``."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if value is not None and _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str) and _SECRET_VALUE.match(value):
        return REDACTED
    return value


def redact_override(override: str) -> str:
    """``key=value`` with the value hidden when the key or value looks secret."""
    key, sep, value = override.partition("=")
    return f"{key}{sep}{REDACTED}" if sep and redact(value, key.rsplit(".", 1)[-1]) == REDACTED else override


def context_from_hydra() -> RunContext:
    """Run directory, name and group of the current Hydra job."""
    hydra = HydraConfig.get()
    output_dir = Path(hydra.runtime.output_dir)
    if hydra.mode == RunMode.MULTIRUN:
        group = "_".join(Path(hydra.sweep.dir).parts[-2:])
        name = hydra.job.override_dirname or f"job{hydra.job.num}"
        return RunContext(output_dir, f"{group}/{name}", group)
    return RunContext(output_dir, "_".join(output_dir.parts[-2:]), None)


def _git_revision() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}
    return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment(overrides: list[str]) -> dict[str, Any]:
    """Package versions, git revision, interpreter, host and the (redacted) command line."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "command": [Path(sys.argv[0]).name, *(redact_override(o) for o in overrides)],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "git": _git_revision(),
        "packages": versions,
    }


def write_run_files(cfg: RunConfig, ctx: RunContext, overrides: list[str]) -> dict[str, Any]:
    """Write ``config.yaml`` and ``environment.json``; return the redacted config as a plain dict."""
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    plain = redact(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))
    (ctx.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(plain), encoding="utf-8")
    (ctx.output_dir / "environment.json").write_text(json.dumps(environment(overrides), indent=2), encoding="utf-8")
    assert isinstance(plain, dict)
    return plain


def run(cfg: RunConfig) -> dict[str, float]:
    """Run the configured method in the current Hydra job; trackers are closed even when it fails."""
    from transformers import set_seed

    ctx = context_from_hydra()
    plain = write_run_files(cfg, ctx, list(HydraConfig.get().overrides.task))
    log.info("run directory: %s", ctx.output_dir)
    set_seed(cfg.seed)
    open_trackers(cfg.logger, ctx, plain)
    try:
        metrics = METHODS[cfg.method.name].run(cfg, ctx)
    finally:
        close_trackers(cfg.logger)
    (ctx.output_dir / "results.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    log.info("final metrics: %s", json.dumps(metrics))
    return metrics
