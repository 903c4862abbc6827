"""Starting runs beyond one process.

Local ranks: :mod:`~alignment.launch.ranks` (entry point :mod:`~alignment.rank`); SLURM jobs:
:mod:`~alignment.launch.slurm`.
"""
