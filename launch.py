"""Compose the run with Hydra and train: ``python launch.py [group=option ...] [key=value ...]``.

Examples:
    python launch.py                                   # SFT of the embedded SmolLM2 on the demo data (CPU)
    python launch.py model=llama8b data=smoltalk_mix --cfg job   # print the composed config, load nothing
    python launch.py -m method.learning_rate=1e-4,2e-4 # a local sweep into multirun/
    python launch.py -m hydra/launcher=slurm method=dpo,smpo  # one SLURM job array (conf/hydra/launcher/)
    python launch.py experiment=optuna_smpo            # an Optuna study of SMPO's beta and learning rate

A user error (bad data row, unknown key, out-of-range value) prints as ``error: ...`` on stderr and exits 1;
``HYDRA_FULL_ERROR=1`` (or ``ALIGNMENT_DEBUG=1``) shows its traceback (:mod:`alignment.cli`).
"""

from __future__ import annotations

from hydra import main
from omegaconf import DictConfig

from alignment.cli import user_errors_reported
from alignment.config import to_run_config
from alignment.launch.slurm import register_launcher_configs
from alignment.registry import register_configs

register_configs()
register_launcher_configs()


@main(version_base="1.3", config_path="conf", config_name="config")
def launch(cfg: DictConfig) -> float | None:
    """Convert the composed config once to the typed run object and run it; return the sweep objective."""
    from alignment.runner import objective_value, run

    run_cfg = to_run_config(cfg)
    return objective_value(run(run_cfg), run_cfg.objective)


if __name__ == "__main__":
    with user_errors_reported():  # a user error prints as one block; HYDRA_FULL_ERROR=1 shows its traceback
        launch()
