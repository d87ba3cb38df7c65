"""Meshes and logical-axis rules: the one place that names axes.

Logical axes (on parameters via `nn.with_logical_partitioning`, on activations via
`nn.with_logical_constraint`):

| logical axis | meaning                          | default mesh axis |
|--------------|----------------------------------|-------------------|
| batch        | examples                         | (data, fsdp)      |
| length       | sequence positions               | None              |
| embed        | model width of parameters        | fsdp              |
| act_embed    | model width of activations       | None              |
| vocab        | vocabulary                       | tensor            |
| heads        | query heads                      | tensor            |
| kv_heads     | key/value heads                  | tensor            |
| head_dim     | per-head width                   | None              |
| mlp          | feed-forward hidden width        | tensor            |
| layers       | stacked layers                   | None              |

Mesh axes are (data, fsdp, tensor). The same rules serve one CPU device, 8 fake CPU devices,
several processes and a TPU pod: only the mesh shape changes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh over all (or the given) devices.

  Args:
    shape: sizes of (data, fsdp, tensor); one -1 takes the remaining devices.

  Raises:
    ValueError: if the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape {shape} must give (data, fsdp, tensor) sizes")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices but "
                     f"{len(devices)} are available; set config.mesh_shape to match, e.g. (-1, 1, 1)")
  mesh_devices = np.asarray(devices).reshape(shape)
  return Mesh(mesh_devices, MESH_AXES)


def rules_from_config(rules) -> tuple[tuple[str, object], ...]:
  """Turns config rules (a list of [name, axis] pairs, axes as str / list / None) into a tuple."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for name, axis in rules:
    out.append((name, tuple(axis) if isinstance(axis, (list, tuple)) else axis))
  return tuple(out)


def logical_to_sharding(logical_tree, mesh: Mesh, rules) -> object:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  specs = nn.logical_to_mesh(logical_tree, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) axis over data and fsdp."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
