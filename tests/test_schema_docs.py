"""Every schema field carries an attribute docstring (style rule 14).

Attribute docstrings are not kept at runtime, so the schema modules are parsed with :mod:`ast`. Which classes are
schemas is taken from the runtime: :class:`RunConfig` and every method schema in ``METHODS``, followed through
their field types and base classes, plus :class:`RunContext`. Every other ``*Config`` dataclass in the schema
modules is checked too, so a schema not yet wired into the tree is not skipped.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from alignment.config import RunConfig
from alignment.context import RunContext
from alignment.registry import METHODS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "alignment"
SCHEMA_MODULES = sorted(
    {
        PACKAGE / "config.py",
        PACKAGE / "models" / "config.py",
        PACKAGE / "data" / "config.py",
        PACKAGE / "loggers.py",
        PACKAGE / "distributed.py",
        PACKAGE / "context.py",
        *(PACKAGE / "methods").glob("*.py"),
    }
)


def _hinted_classes(hint: Any) -> list[type]:
    """Classes named by a type hint, through ``X | None``, ``list[X]`` and ``dict[K, V]``."""
    args = typing.get_args(hint)
    if args:
        return [cls for arg in args for cls in _hinted_classes(arg)]
    return [hint] if isinstance(hint, type) else []


def _runtime_schemas() -> set[type]:
    """Dataclasses reachable from the root schema, the method schemas and the run context."""
    found: set[type] = set()
    todo: list[type] = [RunConfig, RunContext, *(m.schema for m in METHODS.values())]
    while todo:
        cls = todo.pop()
        if cls in found or not dataclasses.is_dataclass(cls):
            continue
        found.add(cls)
        todo.extend(base for base in cls.__mro__[1:] if dataclasses.is_dataclass(base))
        for hint in typing.get_type_hints(cls).values():
            todo.extend(_hinted_classes(hint))
    return found


def _is_dataclass_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return (isinstance(target, ast.Name) and target.id == "dataclass") or (
        isinstance(target, ast.Attribute) and target.attr == "dataclass"
    )


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _parsed_dataclasses(paths: list[Path]) -> dict[tuple[str, str], ast.ClassDef]:
    """``(module, class name) -> ClassDef`` for every module-level dataclass in ``paths``."""
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(_is_dataclass_decorator(d) for d in node.decorator_list):
                found[_module_name(path), node.name] = node
    return found


RUNTIME_SCHEMAS = _runtime_schemas()
PARSED = _parsed_dataclasses(
    sorted(set(SCHEMA_MODULES) | {Path(inspect.getfile(cls)) for cls in RUNTIME_SCHEMAS}),
)
SCHEMA_KEYS = sorted(
    {(cls.__module__, cls.__name__) for cls in RUNTIME_SCHEMAS} | {key for key in PARSED if key[1].endswith("Config")}
)


def undocumented_fields(cls: ast.ClassDef) -> list[str]:
    """Annotated fields of ``cls`` that are not immediately followed by a non-empty string literal."""
    missing = []
    for i, node in enumerate(cls.body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        if "ClassVar" in ast.unparse(node.annotation):
            continue
        following = cls.body[i + 1] if i + 1 < len(cls.body) else None
        documented = (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
            and following.value.value.strip() != ""
        )
        if not documented:
            missing.append(node.target.id)
    return missing


def test_schema_count() -> None:
    """The discovery found the schemas that exist today (so the parametrised test below is not vacuous)."""
    # RunConfig, ModelConfig, LoraConfig, QuantizationConfig, DataConfig, SourceConfig, MethodConfig, SftConfig,
    # DistributedConfig, LoggerConfig, RunContext.
    assert len(SCHEMA_KEYS) >= 11
    assert len(RUNTIME_SCHEMAS) >= 11


def test_every_runtime_schema_was_parsed() -> None:
    """Each schema reachable at runtime is a module-level dataclass in a parsed file."""
    missing = sorted(
        f"{cls.__module__}.{cls.__name__}" for cls in RUNTIME_SCHEMAS if (cls.__module__, cls.__name__) not in PARSED
    )
    assert missing == []


@pytest.mark.parametrize(("module", "name"), SCHEMA_KEYS, ids=[f"{m}.{n}" for m, n in SCHEMA_KEYS])
def test_schema_fields_have_attribute_docstrings(module: str, name: str) -> None:
    """``field: type = default`` is followed by ``\"\"\"What it means.\"\"\"``; the parsed fields are the real ones."""
    node = PARSED[module, name]
    assert undocumented_fields(node) == [], f"{module}.{name}: fields without an attribute docstring"
    cls = getattr(sys.modules[module], name)
    declared = {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    own = {f.name for f in dataclasses.fields(cls)} - {
        f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)
    }
    assert own <= declared, f"{module}.{name}: fields not seen by the parser: {sorted(own - declared)}"


def test_docstring_check_can_fail() -> None:
    """A missing docstring, a comment instead of one, and a non-string expression are all caught."""
    source = '''
@dataclass
class Example:
    """Doc."""

    documented: int = 1
    """Yes."""
    bare: int = 2
    commented: int = 3  # a comment is not a docstring
    numbered: int = 4
    5
    last: str = "x"
'''
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    assert undocumented_fields(node) == ["bare", "commented", "numbered", "last"]
