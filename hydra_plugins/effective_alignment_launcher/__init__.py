"""Hydra discovers launchers only inside the ``hydra_plugins`` namespace; the implementation is in alignment."""
