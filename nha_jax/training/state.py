"""The train state: building the model, its sharded initial state, and the abstract state used to restore into.

state = {"params": nnx.State (float32), "opt_state": optax state, "step": int32 [], "rng": uint32 [2]}.
Every leaf's sharding comes from the logical axis names its parameter was created with (nha_jax.sharding).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from nha_jax.model import LanguageModel
from nha_jax.sharding import tree_shardings


@dataclass
class StateLayout:
    """What the trainer needs to build, shard and restore the state: graphdef plus abstract shapes and shardings."""

    graphdef: nnx.GraphDef
    abstract_state: dict  # ShapeDtypeStructs
    shardings: dict  # NamedShardings, same tree as the state
    init_fn: callable  # rng -> state (jit it with out_shardings=shardings)

    def abstract_with_shardings(self) -> dict:
        """ShapeDtypeStructs carrying their shardings (the restore target for orbax)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract_state, self.shardings)


def build_model(model_cfg: ml_collections.ConfigDict, seq_len: int, rng: jax.Array) -> LanguageModel:
    """A freshly initialised LanguageModel (eager; wrap in jax.jit / nnx.eval_shape for large models)."""
    return LanguageModel(model_cfg, seq_len=seq_len, rngs=nnx.Rngs(params=rng))


def state_layout(config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation, mesh: Mesh
                 ) -> StateLayout:
    """Traces the model and optimizer abstractly (no memory) and derives every leaf's sharding on `mesh`."""

    def init_fn(rng):
        model = build_model(config.model, config.seq_len, rng)
        params = nnx.state(model, nnx.Param)
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.fold_in(rng, 1)}

    seed = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(init_fn, seed)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(config.model, config.seq_len, seed)))
    # Optimizer moments mirror the params (same Param wrappers), so they inherit the params' logical axes.
    shardings = tree_shardings(nnx.get_partition_spec(abstract_state), mesh)
    return StateLayout(graphdef=graphdef, abstract_state=abstract_state, shardings=shardings, init_fn=init_fn)


def count_params(params) -> int:
    """Total number of parameter elements in a (possibly abstract) params tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
