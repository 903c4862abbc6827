"""The package's structure: every module imports on its own, and composing a config loads no ML stack.

The layer contract itself (which layer may import which) is ``.importlinter``, checked by ``lint-imports`` in
``make lint``; these tests catch what a static import graph cannot: import cycles that only break when a module is
imported first (the old ``import alignment.tools.generate`` failure), and heavy imports at compose time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "alignment"
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for path in PACKAGE.rglob("*.py")
)
# Loaded by composing when they must not be: the ML stack (torch's native core, transformers, TRL...).
HEAVY = ("torch._C", "transformers", "trl", "peft", "datasets", "accelerate")


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_every_module_is_found() -> None:
    assert len(MODULES) >= 69, MODULES
    assert "alignment.tools.generate" in MODULES
    assert "alignment.training.trainer" in MODULES


@pytest.fixture(scope="module")
def fresh_imports() -> dict[str, subprocess.CompletedProcess[str]]:
    """``import <module>`` of every module, each in a fresh interpreter, collected before any assertion.

    Two or more run at a time: an import is single-threaded, so the cores share the work.
    """
    workers = max(2, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda module: _python(f"import {module}"), MODULES)
        return dict(zip(MODULES, results, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_in_a_fresh_interpreter(
    module: str, fresh_imports: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = fresh_imports[module]
    assert result.returncode == 0, result.stderr[-3000:]


# Run launch.py in this interpreter and report, at exit, which heavy modules were loaded.
_LAUNCH_AND_REPORT = """
import atexit, json, runpy, sys
heavy = json.loads(sys.argv[1])
report = sys.argv[2]
atexit.register(lambda: open(report, "w").write(json.dumps([m for m in heavy if m in sys.modules])))
sys.argv = ["launch.py", *sys.argv[3:]]
runpy.run_path("launch.py", run_name="__main__")
"""

COMPOSE_ONLY = {
    "help": ["--help"],
    "cfg-job": ["--cfg", "job"],
    "cfg-job-dpo": ["method=dpo", "--cfg", "job"],
    "cfg-job-gpo": ["method=gpo", "data=demo_gpo", "--cfg", "job"],
    "cfg-job-classification": ["method=classification", "data=demo_classification", "--cfg", "job"],
    "cfg-job-reward": ["method=reward", "--cfg", "job"],
    "cfg-job-rm-scoring": ["method=rm_scoring", "--cfg", "job"],
    "cfg-job-dedup": ["method=dedup", "--cfg", "job"],
    "typo-key": ["method.lerning_rate=1e-5"],
    "bad-type": ["method.max_steps=many"],
    "unknown-option": ["method=dpoo"],
    "launcher-without-multirun": ["hydra/launcher=slurm", "model=llama8b"],
}


@pytest.mark.parametrize("args", list(COMPOSE_ONLY.values()), ids=list(COMPOSE_ONLY))
def test_composing_loads_no_ml_stack(args: list[str], tmp_path: Path) -> None:
    """``--help``, ``--cfg job`` and compose-time errors import neither torch nor transformers (nor TRL, PEFT...)."""
    report = tmp_path / "loaded.json"
    result = _python(_LAUNCH_AND_REPORT, json.dumps(HEAVY), str(report), *args)
    assert report.is_file(), result.stderr[-3000:]
    assert json.loads(report.read_text()) == [], result.stdout[-2000:] + result.stderr[-2000:]
    if args[-1] in ("job", "--help"):
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert result.returncode != 0  # a compose-time error, before anything loads


def test_package_init_files_define_nothing() -> None:
    """``__init__.py`` files hold a docstring only (the top package also its version)."""
    import ast

    for path in sorted(PACKAGE.rglob("__init__.py")):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        statements = [
            node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        ]
        if path.parent == PACKAGE:
            assert [ast.unparse(node) for node in statements] == ["__version__ = '0.1.0'"], path
        else:
            assert statements == [], path
