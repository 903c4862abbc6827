"""The package's structure: every module imports on its own, and composing a config loads no ML stack.

The layer contract itself (which layer may import which) is ``.importlinter``, checked by ``lint-imports`` in
``make lint``; these tests catch what a static import graph cannot: import cycles that only break when a module is
imported first (the old ``import alignment.tools.generate`` failure), and heavy imports at compose time.
"""

from __future__ import annotations

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


# The third-party packages the fork server loads before forking: the bulk of every heavy module's import time.
ML_STACK = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
# A fresh interpreter loads ML_STACK (and no module of the package), then imports each module of argv[2] in its own
# forked child, at most argv[4] at a time, and writes {module: "" or the child's traceback} as JSON to argv[3].
_IMPORT_EACH_IN_A_FORK = """
import importlib, json, os, sys, traceback
stack, modules, report, workers = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
for name in stack:
    importlib.import_module(name)
loaded = [m for m in sys.modules if m.split(".")[0] == "alignment"]
assert not loaded, f"the ML stack loaded modules of the package: {loaded}"
errors, running = {}, {}

def reap():
    pid, status = os.wait()
    module, path = running.pop(pid)
    failure = open(path).read() if os.path.exists(path) else f"the child died: wait status {status}"
    errors[module] = "" if status == 0 else failure

for index, module in enumerate(modules):
    if len(running) >= workers:
        reap()
    path = f"{report}.{index}.err"
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            importlib.import_module(module)
        except BaseException:
            with open(path, "w") as file:
                file.write(traceback.format_exc())
            status = 1
        os._exit(status)
    running[pid] = (module, path)
while running:
    reap()
with open(report, "w") as file:
    json.dump(errors, file)
"""


@pytest.fixture(scope="module")
def first_imports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``import <module>`` of every module as the first module of the package, collected before any assertion.

    Each import runs in a child forked from one fresh interpreter that has loaded only :data:`ML_STACK`: an import
    cycle inside the package breaks exactly as in a fresh interpreter, while torch and transformers load once
    instead of once per module (a fresh interpreter per module took ~40 s of the 2-core CI box). Two or more
    children run at a time: an import is single-threaded, so the cores share the work.
    """
    report = tmp_path_factory.mktemp("imports") / "errors.json"
    workers = str(max(2, os.cpu_count() or 1))
    result = _python(_IMPORT_EACH_IN_A_FORK, json.dumps(ML_STACK), json.dumps(MODULES), str(report), workers)
    assert result.returncode == 0, result.stderr[-3000:]
    errors: dict[str, str] = json.loads(report.read_text(encoding="utf-8"))
    assert sorted(errors) == MODULES
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first_of_the_package_in_a_fresh_process(module: str, first_imports: dict[str, str]) -> None:
    assert first_imports[module] == "", first_imports[module][-3000:]


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
