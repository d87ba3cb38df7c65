"""Models: the decoder LM (and, later, encoders), with one variant registry."""
from effjax.models import registry
from effjax.models.lm import LM, KVCache, LMConfig, Output, init_cache, init_params, random_params

__all__ = ["LM", "KVCache", "LMConfig", "Output", "init_cache", "init_params", "random_params",
           "registry"]
