"""What every model config shares: dtype names, matmul precision, their checks and properties.

A config dataclass inherits `Numerics` and calls `check_numerics()` in its `__post_init__`; it must
have the fields `dtype`, `param_dtype` and `matmul_precision`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PRECISIONS = ("default", "high", "highest")


class Numerics:
  """Mixin for frozen config dataclasses with `dtype`, `param_dtype` and `matmul_precision`."""

  def check_numerics(self) -> None:
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {sorted(DTYPES)}")
    if self.matmul_precision not in PRECISIONS:
      raise ValueError(f"matmul_precision={self.matmul_precision!r}; use one of {PRECISIONS} "
                       "('highest' for bit-exactness tests)")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def precision(self):
    return None if self.matmul_precision == "default" else self.matmul_precision

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)
