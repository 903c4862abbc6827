"""Knowledge distillation: losses, trainer, teacher sources."""
