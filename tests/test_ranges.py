"""Every declared field range is enforced when a composed config is converted, naming the key (alignment/ranges.py).

The cases are found by walking the schemas (the root's groups and every ``METHODS[*].schema``, through nested
dataclasses and lists of them), and their count is asserted, so a new bounded field is tested without edits. Each
field is tested once, through the first schema that reaches it: a bad value on each bounded side, derived from the
declared range, must fail ``to_run_config`` with the full key; each boundary value (and a sentinel) must pass.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from alignment.config import RunConfig, to_run_config
from alignment.methods.sft import SftConfig
from alignment.ranges import RANGE, Range, RangeError, check_fields, declared_range
from alignment.registry import METHODS
from alignment.task import MethodConfig
from tests.conftest import launch


class Case(NamedTuple):
    """One bounded field, reached through ``overrides`` (selecting its method) at ``key``."""

    key: str
    """Full key in the composed config (``method.client.concurrency``; ``data.sources[0].seed`` for list items)."""
    overrides: tuple[str, ...]
    """Overrides that select the schema holding the field."""
    hint: Any
    """The field's annotation."""
    allowed: Range
    """The declared range."""


def _dataclass_in(hint: Any) -> tuple[type | None, bool]:
    """The dataclass a hint names (through ``X | None`` and ``list[X]``), and whether it is a list of them."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint, False
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and args and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return args[0], True
    if origin in (types.UnionType, typing.Union):
        found = [cls for cls, _ in map(_dataclass_in, args) if cls is not None]
        return (found[0], False) if found else (None, False)
    return None, False


def _owner(schema: type, name: str) -> type:
    """The class in ``schema``'s MRO whose own body declares ``name`` (a redeclaration counts as its own)."""
    return next(cls for cls in schema.__mro__ if name in inspect.get_annotations(cls))


def _number_type(hint: Any) -> Any:
    """``int`` or ``float``: the annotation's number type, through ``X | None``, ``list[X]`` and ``dict[K, X]``."""
    if typing.get_origin(hint) in (list, dict):
        return typing.get_args(hint)[-1]
    numbers = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return numbers[0] if len(numbers) == 1 else None


UNBOUNDED: dict[str, str] = {
    "SamplingConfig.seed": "sent to the server as is; the server decides what a seed means",
    "DistillConfig.ab_alpha": "any real alpha defines an AB-divergence; its limits (0, -beta) are handled",
    "DistillConfig.ab_beta": "any real beta defines an AB-divergence; its limits (0, -alpha) are handled",
    "PromptOptConfig.forbidden_token_ids": "a list of token ids: negatives fail at compose time, ids past the "
    "model's vocabulary when the tokenizer is read (before any weights load)",
}
"""Numeric fields that deliberately declare no range, with the reason."""
UNBOUNDED_FOUND: set[str] = set()
"""``Owner.field`` of every numeric field without a range that the walk met."""


def _walk(schema: type, prefix: str, overrides: tuple[str, ...], seen: set[tuple[type, str]]) -> list[Case]:
    cases = []
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        key = f"{prefix}.{field.name}" if prefix else field.name
        allowed = declared_range(schema, field.name)
        owner = (_owner(schema, field.name), field.name)
        if allowed is None and _number_type(hints[field.name]) in (int, float):
            UNBOUNDED_FOUND.add(f"{owner[0].__name__}.{field.name}")
        if allowed is not None and owner not in seen:
            seen.add(owner)
            cases.append(Case(key, overrides, hints[field.name], allowed))
        nested, is_list = _dataclass_in(hints[field.name])
        if nested is not None:
            cases.extend(_walk(nested, f"{key}[0]" if is_list else key, overrides, seen))
    return cases


def _cases() -> list[Case]:
    seen: set[tuple[type, str]] = set()
    root = [f for f in dataclasses.fields(RunConfig) if f.name != "method"]
    cases = []
    for field in root:
        hint = typing.get_type_hints(RunConfig)[field.name]
        nested, _ = _dataclass_in(hint)
        if nested is not None:
            cases.extend(_walk(nested, field.name, (), seen))
        elif (allowed := declared_range(RunConfig, field.name)) is not None:
            cases.append(Case(field.name, (), hint, allowed))
        elif _number_type(hint) in (int, float):
            UNBOUNDED_FOUND.add(f"RunConfig.{field.name}")
    for name, method in METHODS.items():
        cases.extend(_walk(method.schema, "method", (f"method={name}",), seen))
    return cases


CASES = _cases()
# A value in range that a method's own cross-field checks would still reject: what they need besides.
EXTRA = {
    ("method=dpo", "method.label_smoothing"): ("method.loss_type=[aot]",),  # label_smoothing acts on aot only
    ("method=prompt_opt", "method.gumbel_temp_end"): ("method.gumbel_temp=10.0",),  # must stay <= gumbel_temp
}
"""Overrides a (method, key) case needs besides the value (rules across fields)."""


def _number(value: float, hint: Any) -> float:
    return int(value) if _number_type(hint) is int else float(value)


def bad_values(case: Case) -> list[float]:
    """One value just outside each bounded side of the range (never the sentinel)."""
    r = case.allowed
    below = r.ge - 1 if r.ge is not None else r.gt
    if below is not None and below == r.sentinel:
        below -= 1
    above = r.le + 1 if r.le is not None else r.lt
    return [_number(v, case.hint) for v in (below, above) if v is not None]


def good_values(case: Case) -> list[float]:
    """Each closed bound, the sentinel, and a value inside when both bounds are open."""
    r = case.allowed
    closed = [v for v in (r.ge, r.le, r.sentinel) if v is not None]
    if closed:
        return [_number(v, case.hint) for v in closed]
    if r.gt is not None and r.lt is not None:
        return [_number((r.gt + r.lt) / 2, case.hint)]
    return [_number(r.gt + 1 if r.gt is not None else r.lt - 1 if r.lt is not None else math.nan, case.hint)]


def override(case: Case, value: float) -> tuple[list[str], str]:
    """The overrides that set the field to ``value``, and the key the error must name."""
    extra = list(EXTRA.get((case.overrides[0], case.key), ())) if case.overrides else []
    origin = typing.get_origin(case.hint)
    if "[0]." in case.key:  # a field of a list item: replace the list with one item
        group, field = case.key.split("[0].")
        return [*case.overrides, *extra, f"{group}=[{{path: a.jsonl, {field}: {value!r}}}]"], case.key
    if origin is list:
        return [*case.overrides, *extra, f"{case.key}=[{value!r}]"], f"{case.key}[0]"
    if origin is dict:
        return [*case.overrides, *extra, f"+{case.key}.a={value!r}"], f"{case.key}.a"
    return [*case.overrides, *extra, f"{case.key}={value!r}"], case.key


def _ids(cases: list[Case]) -> list[str]:
    return [f"{c.overrides[0].split('=')[1] if c.overrides else 'root'}:{c.key}" for c in cases]


def test_case_count() -> None:
    """The walk found the bounded fields that exist today (root, model, data, distributed, methods, tools)."""
    assert len(CASES) >= 100
    keys = {c.key for c in CASES}
    assert {
        "seed",
        "method.max_steps",
        "method.client.concurrency",
        "model.lora.r",
        "data.sources[0].sample_fraction",
    } <= keys
    assert {
        "method.vllm.gpu_memory_utilization",
        "distributed.deepspeed.stage",
        "method.reward_model.max_length",
    } <= keys


def test_every_numeric_field_declares_a_range_or_says_why_not() -> None:
    """A new int or float field must declare its range, or be listed in ``UNBOUNDED`` with a reason."""
    assert set(UNBOUNDED) == UNBOUNDED_FOUND


def test_ranges_sit_on_numeric_fields() -> None:
    """A range is declared only where the value (or each list item / dict value) is a number."""
    for case in CASES:
        assert _number_type(case.hint) in (int, float), f"{case.key}: range on {case.hint}"


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_out_of_range_value_fails_at_conversion_naming_the_key(compose: Any, case: Case) -> None:
    for value in bad_values(case):
        overrides, key = override(case, value)
        cfg = compose(overrides)
        with pytest.raises(RangeError, match=rf"^{re.escape(key)} must be .*, got {re.escape(str(value))}$"):
            to_run_config(cfg)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_boundary_value_passes(compose: Any, case: Case) -> None:
    for value in good_values(case):
        overrides, _ = override(case, value)
        to_run_config(compose(overrides))


def test_message_names_key_value_and_range(compose: Any) -> None:
    with pytest.raises(ValueError, match=r"^method\.max_steps must be -1 \(use num_train_epochs\) or >= 1, got -5$"):
        to_run_config(compose(["method.max_steps=-5"]))
    with pytest.raises(ValueError, match=r"^method\.client\.concurrency must be >= 1, got 0$"):
        to_run_config(compose(["method=generate", "method.client.concurrency=0"]))
    with pytest.raises(ValueError, match=r"^data\.sources\[1\]\.sampling_weight must be > 0, got 0\.0$"):
        to_run_config(
            compose(["data.sources=[{path: a.jsonl, sampling_weight: 1.0}, {path: b.jsonl, sampling_weight: 0}]"])
        )


def test_range_reports_before_cross_field_checks(compose: Any) -> None:
    """The range check runs before ``__post_init__``: a bad value is reported as such, with its full key."""
    with pytest.raises(RangeError, match=r"^method\.label_smoothing must be in \[0, 0\.5\], got 0\.7$"):
        to_run_config(compose(["method=dpo", "method.loss_type=[robust]", "method.label_smoothing=0.7"]))


def test_redeclared_field_keeps_the_base_range() -> None:
    """GPO redeclares ``per_device_train_batch_size`` to change its docstring; the range of MethodConfig holds."""
    schema = METHODS["gpo"].schema
    assert "per_device_train_batch_size" in inspect.get_annotations(schema)
    assert declared_range(schema, "per_device_train_batch_size") == declared_range(
        MethodConfig, "per_device_train_batch_size"
    )


def test_range_semantics() -> None:
    steps = Range(ge=1, sentinel=-1, means="use num_train_epochs")
    assert [steps.allows(v) for v in (-5, -1, 0, 1, 10)] == [False, True, False, True, True]
    assert steps.describe() == "-1 (use num_train_epochs) or >= 1"
    assert Range(gt=0, le=1).describe() == "in (0, 1]"
    assert Range(ge=0, lt=1).describe() == "in [0, 1)"
    assert Range(lt=0).describe() == "< 0"
    assert not Range(gt=0).allows(math.nan)
    assert not Range(lt=0).allows(math.nan)
    with pytest.raises(TypeError, match="one lower bound"):
        Range(ge=0, gt=0)
    with pytest.raises(TypeError, match="at least one bound"):
        Range()


def test_direct_construction_of_a_checked_schema_fails_the_same_way() -> None:
    """Schemas with a ``__post_init__`` call ``check_fields`` first (tests and tools build them directly)."""
    with pytest.raises(RangeError, match=r"^method\.max_steps must be -1 \(use num_train_epochs\) or >= 1, got 0$"):
        SftConfig(max_steps=0)

    @dataclasses.dataclass
    class Probe:
        items: dict[str, float] = dataclasses.field(default_factory=dict, metadata={RANGE: Range(gt=0)})
        """Per-item range."""

    check_fields(Probe({"ok": 1.0}), "probe")
    with pytest.raises(RangeError, match=r"^probe\.items\.bad must be > 0, got -1\.0$"):
        check_fields(Probe({"ok": 1.0, "bad": -1.0}), "probe")


def test_launch_rejects_an_out_of_range_value_before_loading_anything(tmp_path: Path) -> None:
    """``launch.py method.max_steps=-5`` used to train a full epoch; now it exits before any run dir is written.

    (``--cfg job`` only prints the composed config and never converts it; ``plan=true`` and a real run do.)
    """
    result = launch(["model=tiny_random", "method.max_steps=-5"], cwd=tmp_path, timeout=120)
    out = f"{result.stdout}\n{result.stderr}"
    assert result.returncode != 0
    assert "method.max_steps must be -1 (use num_train_epochs) or >= 1, got -5" in out, out
    assert sorted(tmp_path.rglob("config.yaml")) == [], "the run started before the value was rejected"
