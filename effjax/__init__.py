"""effjax: cheap-to-run language models in JAX/Flax, and models that see and hear."""

__version__ = "0.1.0"
