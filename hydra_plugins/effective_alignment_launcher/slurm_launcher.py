"""The launcher ``conf/hydra/launcher/*.yaml`` name: :class:`alignment.launch.slurm.SlurmLauncher`, seen by Hydra.

Hydra instantiates a launcher only when its class is defined under ``hydra_plugins`` ("Invalid plugin ...: not
the hydra_plugins package"), so this subclass only gives the implementation that home.
"""

from __future__ import annotations

from alignment.launch import slurm


class SlurmLauncher(slurm.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher with ``wait`` (submit and return); see alignment.launch.slurm."""
