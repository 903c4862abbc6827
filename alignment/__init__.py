"""effective-alignment: Hydra-composed LLM alignment (import package ``alignment``)."""

__version__ = "0.1.0"
