"""One registry of model variants: `get("lm/tiny")` returns the variant's config.

CPU-sized variants train here in seconds to minutes; full-size shapes (Llama-3-8B, Llama-3.2-1B) are
for `jax.eval_shape` on CPU and for real runs on accelerators.
"""

from __future__ import annotations

from typing import Callable

_REGISTRY: dict[str, Callable[[], object]] = {}


def register(name: str):
  """Decorator: registers a zero-argument function returning a variant's config under `name`."""
  def wrap(fn):
    if name in _REGISTRY:
      raise ValueError(f"model variant {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn
  return wrap


def get(name: str, **overrides):
  """Config of variant `name` with optional field overrides."""
  _ensure_loaded()
  if name not in _REGISTRY:
    raise KeyError(f"unknown model variant {name!r}; known variants: {sorted(_REGISTRY)}")
  config = _REGISTRY[name]()
  return config.replace(**overrides) if overrides else config


def names(prefix: str = "") -> list[str]:
  _ensure_loaded()
  return sorted(n for n in _REGISTRY if n.startswith(prefix))


def _ensure_loaded():
  # Importing the variant modules runs their @register decorators.
  from effjax.models import lm_variants  # noqa: F401
