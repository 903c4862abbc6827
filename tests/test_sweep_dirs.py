"""Sweep job folder names (``hydra.sweep.subdir``): ``<job number>_<overrides>``, redacted, flat and bounded.

The real ``launch.py -m`` sweep is in ``tests/test_launch.py``; here Hydra composes ``conf/config.yaml`` with a
job's overrides and resolves ``hydra.sweep.subdir`` as its launchers do (``hydra.core.utils.run_job``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from alignment.cli import register_resolvers
from alignment.redact import JOB_DIRNAME_MAX_BYTES, job_number, sweep_job_dirname
from tests.conftest import ROOT

HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrSt"  # credential-shaped: must never reach a folder name


@pytest.fixture
def subdir() -> Iterator[Callable[..., str]]:
    """``subdir(overrides, num=0)``: the job folder name Hydra gives sweep job ``num`` with these overrides."""
    from hydra import compose, initialize_config_dir

    from alignment.launch.slurm import register_launcher_configs
    from alignment.registry import register_configs

    register_configs()
    register_launcher_configs()
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):

        def _subdir(overrides: list[str], num: int = 0) -> str:
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.job.num = num
            return str(OmegaConf.select(cfg, "hydra.sweep.subdir"))

        yield _subdir


def test_job_folder_is_the_job_number_and_its_overrides(subdir: Callable[..., str]) -> None:
    assert subdir(["method=dpo", "method.beta=0.1"], num=3) == "3_method.beta-0.1+method-dpo"
    assert subdir([], num=12) == "12"  # no override: Hydra's former ${hydra.job.num}


def test_noisy_keys_stay_out_of_the_name(subdir: Callable[..., str]) -> None:
    """hydra.* and hydra/launcher (never task overrides), plan, objective and the logger choice are left out."""
    name = subdir(
        [
            "method=dpo",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "plan=true",
            "objective=eval_rewards/margins",
            "logger=none",
        ]
    )
    assert name == "0_method-dpo"


def test_secret_is_redacted_in_the_name(subdir: Callable[..., str]) -> None:
    name = subdir(["model=tiny_random", f"logger.entity={HF_TOKEN}"], num=1)
    assert name == "1_logger.entity-redacted+model-tiny_random"


def test_path_values_do_not_nest_folders(subdir: Callable[..., str]) -> None:
    """'/' and the characters a shell or a filesystem mind (':' '[' ']' quotes, spaces) become '_'."""
    name = subdir(["model.name_or_path=/data/llama:8b", "model.chat_template='{{ x }} [v2]'"], num=2)
    assert name == "2_model.chat_template-____x_____v2__+model.name_or_path-_data_llama_8b"


def test_a_long_override_is_cut_and_hashed(subdir: Callable[..., str]) -> None:
    path = "/models/" + "x" * 300
    name = subdir([f"model.name_or_path={path}"], num=7)
    assert len(name.encode()) == JOB_DIRNAME_MAX_BYTES == 200  # 191 bytes of the name, '+', 8 hex digits
    full = f"model.name_or_path={path}"  # Hydra's override_dirname of this job, '/' not yet replaced
    assert name == "7_model.name_or_path-_models_" + "x" * 162 + "+" + hashlib.sha256(full.encode()).hexdigest()[:8]
    # another long value with the same first 200 bytes gets another name
    assert subdir([f"model.name_or_path={path}y"], num=7) != name


def test_redaction_is_applied_before_cutting() -> None:
    """A secret past the cut is not hashed either: the hash is over the redacted overrides."""
    overrides = ["model.name_or_path=/m/" + "x" * 250, f"logger.entity={HF_TOKEN}"]
    dirname = ",".join(sorted(overrides))
    name = sweep_job_dirname(0, dirname, overrides)
    redacted = dirname.replace(HF_TOKEN, "***").replace("***", "redacted")
    assert name.endswith("+" + hashlib.sha256(redacted.encode()).hexdigest()[:8])
    assert "hf_" not in name


@pytest.mark.parametrize(
    ("name", "num"),
    [("0", 0), ("12", 12), ("3_method-dpo", 3), ("12-00-00", None), ("outputs", None), ("_1", None)],
)
def test_job_number_reads_the_prefix(name: str, num: int | None) -> None:
    """Job folders old (``<num>``) and new (``<num>_<overrides>``); a single run's ``<time>`` folder has none."""
    assert job_number(name) == num


def test_the_resolver_names_no_folder_outside_the_sweep(subdir: Callable[..., str], tmp_path: Path) -> None:
    """What Hydra joins to hydra.sweep.dir is a single folder name, for any override value."""
    name = subdir(["model.name_or_path=../../etc", "model.chat_template=/"], num=0)
    assert name == "0_model.chat_template-_+model.name_or_path-.._.._etc"
    assert (tmp_path / name).parent == tmp_path


def test_a_job_folder_can_be_passed_back_as_an_unquoted_override_value(subdir: Callable[..., str]) -> None:
    """``method.source=multirun/<date>/<time>/<job>`` parses: no ``=``, ``,``, brackets or quotes in the name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    name = subdir(["method=dpo", "method.beta=0.1", "model.name_or_path=/data/llama:8b", "logger.tags=[a,b]"])
    (parsed,) = OverridesParser.create().parse_overrides([f"method.source=multirun/2026-12-07/10-00-00/{name}/model"])
    assert parsed.value() == f"multirun/2026-12-07/10-00-00/{name}/model"
