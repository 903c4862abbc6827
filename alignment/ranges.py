"""Declared value ranges of config fields, checked when a composed config is converted, before anything loads.

A schema field that has meaningless values declares the meaningful ones where it is defined::

    max_steps: int = bounded(-1, ge=1, sentinel=-1, means="use num_train_epochs")
    \"\"\"Optimizer steps to run; -1 means use ``num_train_epochs``.\"\"\"

The attribute docstring stays the one place that documents the field; the range only says what the checks accept.
:func:`check_ranges` walks a composed config and raises :class:`RangeError` with the full key, the value and the
allowed range (``method.max_steps must be -1 (use num_train_epochs) or >= 1, got -5``).
:func:`alignment.config.to_run_config` (``launch.py``, ``plan=true``, every rank) calls it before
``OmegaConf.to_object``, so no ``__post_init__`` sees an out-of-range value. Schemas whose ``__post_init__`` checks
more (rules across fields) call :func:`check_fields` first, so building them directly fails the same way.

``None`` is always in range: an optional field's ``None`` means "off" or "the default", as its docstring says. A
range on a list or dict field applies to each item. A subclass that redeclares a field only to change its default
keeps the base class's range (:func:`declared_range`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

T = TypeVar("T")

RANGE = "range"
"""Key of the :class:`Range` in a dataclass field's ``metadata``."""


class RangeError(ValueError):
    """A config value lies outside its field's declared range."""


@dataclass(frozen=True)
class Range:
    """An interval, each side closed, open or unbounded, plus optionally one sentinel value outside it."""

    ge: float | None = None
    """Inclusive lower bound."""
    gt: float | None = None
    """Exclusive lower bound."""
    le: float | None = None
    """Inclusive upper bound."""
    lt: float | None = None
    """Exclusive upper bound."""
    sentinel: float | None = None
    """One more accepted value that selects other behaviour (``max_steps=-1``)."""
    means: str = ""
    """What the sentinel selects, in the error message."""

    def __post_init__(self) -> None:
        if (self.ge is not None and self.gt is not None) or (self.le is not None and self.lt is not None):
            raise TypeError(f"{self}: give one lower bound (ge or gt) and one upper bound (le or lt)")
        if (self.ge, self.gt, self.le, self.lt) == (None, None, None, None):
            raise TypeError("a Range needs at least one bound")

    def allows(self, value: float) -> bool:
        """Whether ``value`` is the sentinel or inside the interval (NaN never is)."""
        if self.sentinel is not None and value == self.sentinel:
            return True
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        """The accepted values in words: ``>= 1``, ``in (0, 1]``, ``-1 (use num_train_epochs) or >= 1``."""
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low is not None and high is not None:
            interval = f"in {low}, {high}"
        elif low is not None:
            interval = f">= {self.ge}" if self.ge is not None else f"> {self.gt}"
        else:
            interval = f"<= {self.le}" if self.le is not None else f"< {self.lt}"
        if self.sentinel is None:
            return interval
        meaning = f" ({self.means})" if self.means else ""
        return f"{self.sentinel}{meaning} or {interval}"


def bounded(
    default: T,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    sentinel: float | None = None,
    means: str = "",
) -> T:
    """A dataclass field with a scalar ``default`` and a declared :class:`Range`.

    A list or dict field (whose range applies to each item) spells it out, since ruff's RUF009 cannot see that a
    call returns a ``Field``: ``field(default_factory=dict, metadata={RANGE: Range(gt=0)})``.
    """
    return field(default=default, metadata={RANGE: Range(ge=ge, gt=gt, le=le, lt=lt, sentinel=sentinel, means=means)})


def declared_range(schema: type, name: str) -> Range | None:
    """The range of field ``name`` of dataclass ``schema``, from the nearest class in its MRO that declares one."""
    for cls in schema.__mro__:
        declared = getattr(cls, "__dataclass_fields__", {}).get(name)
        if declared is not None and RANGE in declared.metadata:
            found = declared.metadata[RANGE]
            assert isinstance(found, Range)
            return found
    return None


def check_value(key: str, value: Any, allowed: Range) -> None:
    """Check one value (each item of a list or dict) against its field's range.

    Raises:
        RangeError: names ``key``, the value and the range.
        TypeError: the range was declared on a field that does not hold numbers.
    """
    if value is None:
        return
    if isinstance(value, Mapping):
        for name, item in value.items():
            check_value(f"{key}.{name}", item, allowed)
        return
    if isinstance(value, Sequence) and not isinstance(value, str):
        for i, item in enumerate(value):
            check_value(f"{key}[{i}]", item, allowed)
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key}: a range is declared on a field holding {type(value).__name__}, not numbers")
    if not allowed.allows(value):
        raise RangeError(f"{key} must be {allowed.describe()}, got {value}")


def check_fields(obj: Any, path: str) -> None:
    """Check the declared ranges of one dataclass instance's own fields (not of nested dataclasses).

    Raises:
        RangeError: the first field out of range, as ``<path>.<field>``.
    """
    for declared in dataclasses.fields(obj):
        allowed = declared_range(type(obj), declared.name)
        if allowed is not None:
            check_value(f"{path}.{declared.name}", getattr(obj, declared.name), allowed)


def check_ranges(node: DictConfig | ListConfig, path: str = "") -> None:
    """Check every declared range in a composed config, nested schemas and lists of them included.

    Raises:
        RangeError: the first value out of range, with its full key (``method.client.concurrency``).
    """
    if node._is_none() or node._is_missing():
        return
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            if isinstance(item, DictConfig | ListConfig):
                check_ranges(item, f"{path}[{i}]")
        return
    schema = OmegaConf.get_type(node)
    is_schema = isinstance(schema, type) and dataclasses.is_dataclass(schema)
    for key in node:
        full = f"{path}.{key!s}" if path else str(key)
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig):
            check_ranges(child, full)
        allowed = declared_range(schema, str(key)) if is_schema and schema is not None else None
        if allowed is not None and child is not None and not child._is_missing():
            check_value(full, node[key], allowed)
