"""Group policy optimisation (offline GRPO): group advantages over one shared-prompt packed forward."""
