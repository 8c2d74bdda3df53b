"""Building blocks shared by the networks: parameters with logical axes, sharding constraints
on activations, Dense, LayerNorm, RMSNorm, LoRA adapters, and stacked (scanned) layers."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = {
    "none": None,  # keep every activation: fastest, most memory
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs only
}


# Logical names of the activations every network has (training/sharding.py maps them).
RESIDUAL = ("batch", "length", "activation_embed")
HEADS = ("batch", "length", "heads", "kv")
MLP = ("batch", "length", "mlp")

# (logical axes, shape) -> PartitionSpec or None, set by training (`activation_sharding`).
_ACTIVATION_SPEC: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("activation_spec", default=None)


@contextlib.contextmanager
def activation_sharding(logical_to_spec: Callable):
    """Within it, `constrain` lays activations out by `logical_to_spec(logical_axes, shape)`
    (training/sharding.py's rules); outside it `constrain` does nothing, so the models stay
    free of any mesh."""
    token = _ACTIVATION_SPEC.set(logical_to_spec)
    try:
        yield
    finally:
        _ACTIVATION_SPEC.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """x with a sharding constraint from its dimensions' logical names, e.g. ('batch',
    'length', 'activation_embed'). Without it XLA may keep weights sharded and replicate the
    batch instead, which gives the right numbers with every device computing every sample."""
    to_spec = _ACTIVATION_SPEC.get()
    spec = None if to_spec is None else to_spec(tuple(logical_axes), x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    *,
    dtype=jnp.float32,
    init: str = "normal",
    stddev: float = 0.02,
) -> nnx.Param:
    """A parameter with its logical axis names (read by training/sharding.py)."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {shape} and logical axes {logical_axes} differ in rank")
    if init == "normal":
        value = stddev * jax.random.normal(rngs.params(), tuple(shape), dtype)
    elif init == "zeros":
        value = jnp.zeros(tuple(shape), dtype)
    elif init == "ones":
        value = jnp.ones(tuple(shape), dtype)
    else:
        raise ValueError(f"unknown initialiser {init!r}")
    return nnx.Param(value, logical_axes=tuple(logical_axes))


class Dense(nnx.Module):
    """x @ kernel + bias over the last axis (so also a 1x1 convolution of a channels-last map),
    computed in x's dtype. kernel [in, out], normal with stddev 1/sqrt(in) unless given."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        logical_axes: tuple[str | None, str | None],
        *,
        bias: bool = True,
        stddev: float | None = None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        stddev = in_features**-0.5 if stddev is None else stddev
        self.kernel = param(rngs, (in_features, out_features), logical_axes, dtype=param_dtype, stddev=stddev)
        self.bias = param(rngs, (out_features,), logical_axes[1:], dtype=param_dtype, init="zeros") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class LoRA(nnx.Module):
    """A low-rank adapter (Hu et al., 2021) beside a frozen projection whose kernel is
    [*inputs, *outputs]: it adds scale · (x @ a) @ b, with a [*inputs, rank] normal (stddev
    1/sqrt(fan-in)), b [rank, *outputs] zeros (so a new adapter changes nothing) and
    scale = alpha / rank. a and b take the kernel's logical axes on their input and output
    dimensions, so they are sharded as the kernel is; the rank dimension stays whole.

    Not flax's nnx.LoRA: that one is 2-D only and has no alpha, while the attention kernels are
    [embed, heads, head_dim] and [heads, head_dim, embed] and their adapters keep the heads axis
    (laid out over 'tensor' like the kernel's, and merged without reshapes). Nor qwix's
    LoraProvider (not a dependency), which adds adapters by intercepting the model's matmuls
    as it runs; declared here, they are parameters of the scanned layer like any other, with
    logical axes. The variables are flax's nnx.LoRAParam, an nnx.Param, so a filter tells
    adapters from base weights by type.
    """

    def __init__(self, kernel: nnx.Param, num_inputs: int, *, rank: int, alpha: float, rngs: nnx.Rngs):
        value, axes = kernel.get_value(), kernel.get_metadata()["logical_axes"]
        shape, dtype = value.shape, value.dtype
        stddev = math.prod(shape[:num_inputs]) ** -0.5
        self.a = nnx.LoRAParam(
            stddev * jax.random.normal(rngs.params(), (*shape[:num_inputs], rank), dtype),
            logical_axes=(*axes[:num_inputs], None),
        )
        self.b = nnx.LoRAParam(jnp.zeros((rank, *shape[num_inputs:]), dtype), logical_axes=(None, *axes[num_inputs:]))
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., *inputs] -> the update [..., *outputs], computed in x's dtype."""
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        low = jnp.tensordot(x, a, axes=a.ndim - 1) * self.scale  # scaled at width `rank`, the cheapest place
        return jnp.tensordot(low, b, axes=1)


def merge_lora(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """kernel + scale · a @ b for stacked layers (kernel [L, *inputs, *outputs], a [L, *inputs,
    rank], b [L, rank, *outputs]), in float32 at full matmul precision (TPUs multiply float32 in
    bfloat16 passes by default), returned in the kernel's dtype."""
    num_layers, rank = a.shape[0], a.shape[-1]
    update = jnp.matmul(
        a.reshape(num_layers, -1, rank).astype(jnp.float32),
        b.reshape(num_layers, rank, -1).astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return (kernel.astype(jnp.float32) + scale * update.reshape(kernel.shape)).astype(kernel.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32, returned in the input's dtype."""

    def __init__(
        self, features: int, *, eps: float, logical_axis: str | None = None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.scale = param(rngs, (features,), (logical_axis,), dtype=param_dtype, init="ones")
        self.bias = param(rngs, (features,), (logical_axis,), dtype=param_dtype, init="zeros")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        x32 = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, computed in float32 as LLaMA does, returned in the input's dtype."""

    def __init__(
        self, features: int, *, eps: float, logical_axis: str | None = None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.scale = param(rngs, (features,), (logical_axis,), dtype=param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


_Layer = TypeVar("_Layer", bound=nnx.Module)


def stacked(num_layers: int, make_layer: Callable[[nnx.Rngs], _Layer], rngs: nnx.Rngs) -> _Layer:
    """`num_layers` copies of a layer with independent initialisation, stacked on a leading
    'layers' axis, to be run with `scan_layers` (compile time independent of depth)."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None, "logical_axes": "layers"})
    def make(layer_rngs):
        return make_layer(layer_rngs)

    return make(rngs)


def scan_layers(
    layers: nnx.Module,
    carry,
    per_layer_inputs=None,
    *,
    call: Callable,
    remat_policy: str = "none",
    num_layers: int | None = None,
):
    """Runs `call(layer, carry, per_layer_input) -> (carry, per_layer_output)` over stacked layers.

    `num_layers` runs only the first layers (e.g. to read an intermediate hidden state).
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(layers)
    if num_layers is not None:
        state = jax.tree.map(lambda x: x[:num_layers], state)

    def body(carry, inputs):
        layer_state, layer_input = inputs
        return call(nnx.merge(graphdef, layer_state), carry, layer_input)

    if remat_policy != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    return jax.lax.scan(body, carry, (state, per_layer_inputs))


@functools.cache
def dtype_of(name: str):
    """'float32' / 'bfloat16' (config strings) -> a jnp dtype."""
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from None
