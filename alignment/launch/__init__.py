"""Starting runs beyond one process.

Local ranks: :mod:`~alignment.launch.distributed` (entry point :mod:`~alignment.launch.rank`); SLURM jobs:
:mod:`~alignment.launch.slurm`.
"""
