"""The device mesh and the one table that maps logical axis names to it.

Parameters carry logical axis names (`nnx.Param(..., logical_axes=('embed', 'mlp'))`), and
the models name the dimensions of their activations (`models.layers.constrain`).
`LOGICAL_AXIS_RULES` says which mesh axis each name is split over: 'fsdp' shards parameters
and optimizer state (ZeRO-3 style: each device holds 1/fsdp of every matrix and XLA gathers
a layer's weights when it runs), 'tensor' splits heads and the MLP (Megatron style), and the
batch is split over 'data' x 'fsdp'.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from avllm_jax import checkpoint
from avllm_jax.models.avllm import AVLLM, PARTS

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    # Activations: each device keeps its own samples, and the width of the residual stream
    # stays whole, so that a layer's weights are gathered to the batch, not the batch to them.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("activation_embed", None),
)


def make_mesh(shape: dict | tuple, devices=None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 for "the rest of the devices"."""
    devices = devices if devices is not None else jax.devices()
    sizes = [int(shape[a]) for a in MESH_AXES] if isinstance(shape, dict) else [int(s) for s in shape]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical_axes, shape, mesh, rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for a tensor; a dimension its mesh axes do not divide stays whole, and a
    mesh axis is used at most once per tensor."""
    table = dict(rules)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(logical_axes, shape):
        mesh_axes = table.get(name) if name is not None else None
        if isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        mesh_axes = tuple(a for a in (mesh_axes or ()) if a not in used and mesh.shape[a] > 1)
        if not mesh_axes or size % math.prod(mesh.shape[a] for a in mesh_axes):
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
    return PartitionSpec(*spec)


def activation_spec(logical_axes, shape) -> PartitionSpec | None:
    """The layout of an activation on the mesh being traced for (jax.set_mesh or an abstract
    mesh); None without one. What `models.layers.activation_sharding` takes."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else logical_to_spec(logical_axes, shape, mesh)


def state_shardings(state, mesh):
    """NamedShardings for every leaf of an nnx.State (or a pytree of Variables), from each
    Variable's `logical_axes` metadata; variables without it are replicated."""

    def sharding_of(variable):
        axes = variable.get_metadata().get("logical_axes")
        shape = np.shape(variable.get_value())
        spec = logical_to_spec(axes, shape, mesh) if axes else PartitionSpec()
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def shard_batch(batch: dict, mesh) -> dict:
    """This host's slice of the global batch -> global jax.Arrays split over data x fsdp."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def create_sharded_model(model_config, init_dir, mesh, seed):
    """The model with parameters laid out on the mesh (restored from `init_dir` or random)."""
    if init_dir is not None:
        overrides = {
            part: dataclasses.asdict(getattr(model_config, part)) for part in PARTS if getattr(model_config, part)
        }
        shardings = state_shardings(checkpoint.abstract_model(model_config)[1], mesh)
        return checkpoint.load_model(init_dir, config_overrides=overrides, shardings=shardings)
    graphdef, init = _random_init(model_config, mesh, seed)
    return nnx.merge(graphdef, init())


@functools.lru_cache(maxsize=4)
def _random_init(model_config, mesh, seed):
    """The model's graph and its jitted random initialisation on one mesh. Kept, so that
    building the same model again in a process (an evaluation after training, a cache build
    per shard) reuses the compiled program: compiling every parameter's RNG ops takes tens of
    seconds on a CPU host with 8 devices."""
    graphdef, abstract_state = checkpoint.abstract_model(model_config)

    def init():
        return nnx.state(AVLLM(model_config, rngs=nnx.Rngs(seed)))

    return graphdef, jax.jit(init, out_shardings=state_shardings(abstract_state, mesh))


def optimizer_shardings(optimizer, params, mesh):
    """Each moment tensor is laid out like the parameter it mirrors (sharded over fsdp, as
    ZeRO does); scalars such as the step count are replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(
        optimizer,
        lambda _, param_sharding: param_sharding,
        jax.eval_shape(optimizer.init, params),
        state_shardings(params, mesh),
        transform_non_params=lambda _: replicated,
    )
