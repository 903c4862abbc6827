"""The training kit every method builds on: arguments, the step-normalised trainer, packed forward, checkpoints."""
