"""Hard-prompt optimisation (``method=prompt_opt``): a real-token prompt learned against a frozen model."""
