"""The train state and its sharded creation: `jax.eval_shape`, then `jax.jit(out_shardings=...)`.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the rules in
`config.sharding.rules` map them to the (data, fsdp, tensor) mesh. Optimizer moments inherit the
sharding of the parameter they track, so FSDP shards Adam's state as well. Nothing is materialized
on one device first: every array is created where it lives.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from effjax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. A plain pytree, so Orbax saves it as one item.

  Attributes:
    step: [] int32, optimizer steps taken.
    params: the parameter pytree (unboxed arrays).
    opt_state: optax state.
    rng: [2] uint32 base key; step `s` uses `fold_in(rng, s)`, so resuming needs no rng bookkeeping.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def param_shardings(abstract_boxed, mesh: Mesh, rules) -> Any:
  """NamedShardings for parameters from their logical axes (replicated where there are none)."""
  specs = nn.get_partition_spec(abstract_boxed)
  return sharding_lib.logical_to_sharding(specs, mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, p_shardings,
                        mesh: Mesh) -> Any:
  """Optimizer-state shardings: each moment like its parameter, counters replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(
      # Frozen parameters keep optax's empty MaskedNode placeholders: nothing to shard there.
      tx, lambda x, s: x if isinstance(x, optax.MaskedNode) else s, abstract_opt, p_shardings,
      transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
      is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))


class StateFactory:
  """Shapes, shardings and a jitted initializer of the TrainState, computed without allocating it.

  Attributes:
    abstract: ShapeDtypeStruct pytree of the TrainState, with shardings (an Orbax restore target).
    shardings: NamedSharding pytree of the TrainState.
    abstract_boxed_params: the params as `init_fn` returns them, boxed with logical axes.
  """

  def __init__(self, init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               mesh: Mesh, rules):
    """Traces `init_fn` (rng -> params, possibly boxed with logical axes) abstractly.

    Args:
      init_fn: `rng -> params`; boxed params (`nn.with_logical_partitioning`) get sharded by
        `rules`, unboxed ones are replicated.
      tx: the optimizer.
      mesh: the device mesh.
      rules: logical-axis rules.
    """
    self.mesh, self.rules, self._tx, self._init_fn = mesh, rules, tx, init_fn
    key = jax.random.PRNGKey(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      self.abstract_boxed_params = jax.eval_shape(init_fn, key)
      abstract_state = jax.eval_shape(self._make, key, key)
    p_shard = param_shardings(self.abstract_boxed_params, mesh, rules)
    repl = NamedSharding(mesh, PartitionSpec())
    self.shardings = TrainState(
        step=repl, params=p_shard, rng=repl,
        opt_state=opt_state_shardings(tx, abstract_state.params, p_shard, mesh))
    self.abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        self.shardings)

  def _make(self, init_rng, state_rng) -> TrainState:
    params = nn.unbox(self._init_fn(init_rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self._tx.init(params), rng=state_rng)

  def init(self, rng: jax.Array) -> TrainState:
    """A fresh sharded state: `rng` [2] uint32 is split into the init key and the base step key."""
    init_rng, state_rng = jax.random.split(rng)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(self._make, out_shardings=self.shardings)(init_rng, state_rng)
