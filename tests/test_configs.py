"""Every config option composes and converts to the typed run object; YAML only overrides the schemas.

Cases are found by globbing ``conf/``, and their count is asserted, so a new option is tested without edits and
a broken glob cannot pass with zero cases (style rules 4, 5, 6, 10).
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, Node, OmegaConf

from alignment.config import RunConfig, to_run_config
from alignment.data.config import DataConfig, SourceConfig
from alignment.distributed import DistributedConfig
from alignment.loggers import LoggerBackend, LoggerConfig
from alignment.models.config import ModelConfig
from alignment.registry import METHODS, register_configs
from alignment.task import MethodConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SCHEMA_GROUPS = {
    "model": ModelConfig,
    "method": None,  # the registered schema of the option's method: METHODS[name].schema
    "data": DataConfig,
    "distributed": DistributedConfig,
    "logger": LoggerConfig,
}
# Hydra's own groups (e.g. conf/hydra/launcher/slurm.yaml) need their plugins and are not run options.
NOT_RUN_GROUPS = {"hydra"}
ROOT_DEFAULTS = {next(iter(d)) for d in OmegaConf.load(CONF / "config.yaml").defaults if isinstance(d, DictConfig)}


def _options() -> list[tuple[str, str]]:
    """``(group, option)`` for every ``conf/<group>/**/*.yaml``; nested folders give ``sub/option``."""
    return [
        (group.name, path.relative_to(group).with_suffix("").as_posix())
        for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in NOT_RUN_GROUPS)
        for path in sorted(group.rglob("*.yaml"))
    ]


def _override(group: str, option: str) -> str:
    """``group=option`` for a group in ``conf/config.yaml``'s defaults, else ``+group=option`` (experiments)."""
    return f"{group}={option}" if group in ROOT_DEFAULTS else f"+{group}={option}"


OPTIONS = _options()
SCHEMA_OPTIONS = [(g, o) for g, o in OPTIONS if g in SCHEMA_GROUPS]
CROSS = list(
    itertools.product(
        sorted(p.stem for p in (CONF / "method").glob("*.yaml")),
        sorted(p.stem for p in (CONF / "distributed").glob("*.yaml")),
    )
)


def test_case_counts() -> None:
    """The globs found every option that exists today; a broken glob or a deleted group fails here."""
    assert len(OPTIONS) >= 14  # model 5, method 1, data 2, distributed 1, logger 5
    assert len(CROSS) >= 1  # method 1 x distributed 1
    assert {g for g, _ in OPTIONS} >= set(SCHEMA_GROUPS)


# Type checking of the converted object: every dataclass field holds a value of its annotated type.


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint in (int, float, bool):
        return type(value) is hint  # no bool for int, no int or str for float
    return isinstance(value, hint)


def _type_errors(obj: Any, path: str) -> list[str]:
    """Fields of the dataclass ``obj`` (recursively) whose value does not match the annotation."""
    errors = []
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        where = f"{path}.{field.name}"
        if not _matches(value, hints[field.name]):
            errors.append(f"{where}: {type(value).__name__} {value!r} is not {hints[field.name]}")
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if dataclasses.is_dataclass(item):
                errors.extend(_type_errors(item, f"{where}[{i}]" if isinstance(value, list) else where))
    return errors


def _check_run_config(run: RunConfig) -> None:
    assert type(run) is RunConfig
    assert type(run.model) is ModelConfig
    assert type(run.data) is DataConfig
    assert all(type(s) is SourceConfig for s in run.data.sources)
    assert type(run.distributed) is DistributedConfig
    assert type(run.logger) is LoggerConfig
    assert run.method.name in METHODS, f"method.name {run.method.name!r} is not registered in METHODS"
    assert type(run.method) is METHODS[run.method.name].schema
    assert _type_errors(run, "cfg") == []


def test_type_check_can_fail() -> None:
    """The checker flags a str where an enum belongs, an int for a float, and bad items deep in lists."""
    data = DataConfig(sources=[SourceConfig(path="a.jsonl", columns={"a": 1})])  # type: ignore[dict-item]
    run = RunConfig(
        model=ModelConfig(name_or_path="m", dtype="auto"),  # type: ignore[arg-type]
        # The schema's own int literals for float fields (save_steps=500) become floats only through OmegaConf.
        method=METHODS["sft"].schema(learning_rate=1, save_steps=500.0, logging_steps=10.0),
        data=data,
        distributed=DistributedConfig(),
        logger=LoggerConfig(backend=LoggerBackend.console),
    )
    assert sorted(e.split(":")[0] for e in _type_errors(run, "cfg")) == [
        "cfg.data.sources[0].columns",
        "cfg.method.learning_rate",
        "cfg.model.dtype",
    ]


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, value)]


def _option_file(group: str, option: str) -> dict[str, Any]:
    """``conf/<group>/<option>.yaml`` as plain values, its ``defaults`` list included."""
    values = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    assert isinstance(values, dict)
    return {str(key): value for key, value in values.items()}


def _option_values(group: str, option: str) -> dict[str, Any]:
    """What the option file itself sets (without its ``defaults`` list)."""
    values = _option_file(group, option)
    values.pop("defaults", None)
    return values


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_converts(compose: Any, group: str, option: str) -> None:
    """Each option composes alone (other groups at their defaults), converts, and its values arrive typed."""
    cfg = compose([_override(group, option)])
    run = to_run_config(cfg)
    _check_run_config(run)
    if group not in SCHEMA_GROUPS:
        return
    expected = SCHEMA_GROUPS[group]
    assert type(getattr(run, group)) is (expected or METHODS[run.method.name].schema)
    converted = OmegaConf.to_container(OmegaConf.structured(getattr(run, group)), enum_to_str=True)
    for key, value in _leaves(_option_values(group, option)):
        assert OmegaConf.select(OmegaConf.create(converted), key) == value, f"{group}.{key} not applied"


@pytest.mark.parametrize(("method", "distributed"), CROSS, ids=[f"{m}-{d}" for m, d in CROSS])
def test_method_x_distributed(compose: Any, method: str, distributed: str) -> None:
    """Every method composes with every process layout."""
    run = to_run_config(compose([f"method={method}", f"distributed={distributed}"]))
    _check_run_config(run)
    assert type(run.method) is METHODS[method].schema


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registered_method_has_its_three_files(name: str) -> None:
    """Rule 8: the same stem in ``alignment/<kind>/[<family>/]``, ``conf/method/`` and ``tests/<kind>/[<family>/]``.

    ``<kind>`` is ``methods`` for training methods and ``tools`` for data tools (generation, scoring, dedup); a
    method family that shares a trainer (``pairwise``, ``gpo``, ``seqcls``) is a folder, mirrored in tests/.
    """
    module = METHODS[name].schema.__module__
    parts = module.split(".")
    kind, folder = parts[1], parts[2:-1]
    assert kind in ("methods", "tools"), module
    assert parts[-1] == name, module
    assert len(folder) <= 1, module  # at most one family folder
    assert issubclass(METHODS[name].schema, MethodConfig) == (kind == "methods"), module
    assert (CONF / "method" / f"{name}.yaml").is_file()
    assert (ROOT / "tests" / kind / Path(*folder) / f"test_{name}.py").is_file()


def test_method_options_are_registered(compose: Any) -> None:
    """No ``conf/method`` file points at a method that ``METHODS`` does not run."""
    for path in sorted((CONF / "method").glob("*.yaml")):
        assert compose([f"method={path.stem}"]).method.name in METHODS, path


# Rule 5/6: every group option extends its registered schema and sets only values that differ from it.


def _schema_node(group: str, option: str) -> DictConfig:
    """The schema named in the option's ``defaults: [/schema/<group>@_here_: <name>]``."""
    defaults = _option_file(group, option).get("defaults", [])
    names = [d[f"/schema/{group}@_here_"] for d in defaults if isinstance(d, dict) and f"/schema/{group}@_here_" in d]
    assert len(names) == 1, f"conf/{group}/{option}.yaml must extend one schema (defaults: [/schema/{group}@_here_: …])"
    register_configs()
    node = ConfigStore.instance().load(f"schema/{group}/{names[0]}.yaml").node
    assert isinstance(node, DictConfig)
    return node


def _plain(node: Node) -> Any:
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, enum_to_str=True)
    value = node._value()
    return value.value if isinstance(value, Enum) else value


def _same_as_default(value: Any, default: Node, path: str) -> list[str]:
    """Paths under ``path`` where the option's ``value`` equals the schema default (MISSING fields skipped)."""
    if isinstance(default, ListConfig) and isinstance(value, list):
        element = default._metadata.element_type
        if dataclasses.is_dataclass(element):
            item = OmegaConf.structured(element)
            return [p for i, v in enumerate(value) for p in _same_as_default(v, item, f"{path}[{i}]")]
    if default._is_missing():
        return []
    if isinstance(default, DictConfig) and isinstance(value, dict) and OmegaConf.get_type(default) is not dict:
        fields = set(default.keys())  # not `key in default`: that is False for a MISSING value
        return [
            p
            for key, v in value.items()
            if key in fields
            for p in _same_as_default(v, default._get_node(key), f"{path}.{key}")  # type: ignore[arg-type]
        ]
    return [path] if _plain(default) == value else []


# Repeats found when this test was written, reported for fixing in conf/ (strict: a fixed file fails here until
# its entry is deleted).
KNOWN_REPEATS: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize(
    ("group", "option"),
    [
        pytest.param(g, o, id=f"{g}={o}", marks=[pytest.mark.xfail(reason=KNOWN_REPEATS[g, o], strict=True)])
        if (g, o) in KNOWN_REPEATS
        else pytest.param(g, o, id=f"{g}={o}")
        for g, o in SCHEMA_OPTIONS
    ],
)
def test_option_sets_only_what_differs_from_the_schema(group: str, option: str) -> None:
    """A key set to its schema default is a second copy of that default, free to drift (verl#6479)."""
    schema = _schema_node(group, option)
    repeated = _same_as_default(_option_values(group, option), schema, group)
    assert repeated == [], f"conf/{group}/{option}.yaml repeats schema defaults: {repeated}"


def test_default_detection_can_fail() -> None:
    """The walker above flags equal leaves, nested dicts, enums and list-of-dataclass items."""
    register_configs()
    model = ConfigStore.instance().load("schema/model/model.yaml").node
    data = ConfigStore.instance().load("schema/data/data.yaml").node
    assert _same_as_default({"name_or_path": "x", "dtype": "auto", "lora": {"r": 16}}, model, "model") == [
        "model.dtype",
        "model.lora.r",
    ]
    assert _same_as_default({"sources": [{"path": "a", "split": "train"}], "seed": 1}, data, "data") == [
        "data.sources[0].split"
    ]
    assert _same_as_default({"dtype": "bfloat16", "lora": {"r": 8}}, model, "model") == []


def test_unknown_key_check_accepts_optional_containers_that_are_none() -> None:
    """A ``list[str] | None`` or ``dict | None`` field left at None is not a container to walk."""
    from dataclasses import dataclass

    from alignment.config import UnknownKeyError, check_known_keys

    @dataclass
    class Optionals:
        names: list[str] | None = None
        weights: dict[str, float] | None = None

    check_known_keys(OmegaConf.structured(Optionals))
    node = OmegaConf.structured(Optionals)
    node.names = ["a"]
    check_known_keys(node)
    OmegaConf.set_struct(node, False)
    node.extra = 1
    with pytest.raises(UnknownKeyError, match="extra"):
        check_known_keys(node)


# Methods whose rows the default data (demo) lacks pick their own demo data (its train file); the others keep demo.
METHOD_DEMO_DATA = {
    "gpo": "embedded:gpo_train.jsonl",
    "classification": "embedded:classification_train.jsonl",
    "reward": "embedded:reward_train.jsonl",
    "generate": "embedded:basket.jsonl",
    "sft": "embedded:train.jsonl",
}


def _train_paths(cfg: DictConfig) -> list[str]:
    return [source.path for source in to_run_config(cfg).data.sources]


@pytest.mark.parametrize(("method", "path"), METHOD_DEMO_DATA.items(), ids=list(METHOD_DEMO_DATA))
def test_a_method_picks_its_demo_data_unless_data_is_given(compose: Any, method: str, path: str) -> None:
    """``method=gpo`` alone trains on demo_gpo; ``data=...`` (either order) and an experiment win over it."""
    assert _train_paths(compose([f"method={method}"])) == [path]
    assert _train_paths(compose([f"method={method}", "data=demo"])) == ["embedded:train.jsonl"]
    assert _train_paths(compose(["data=demo_reward", f"method={method}"])) == ["embedded:reward_train.jsonl"]
    debug = OmegaConf.load(CONF / "data" / "debug" / f"{method}.yaml")
    assert _train_paths(compose([f"method={method}", "experiment=debug"])) == [debug.sources[0].path]
