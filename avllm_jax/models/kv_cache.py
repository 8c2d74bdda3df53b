"""The decoder's key/value cache: one array per layer, and where a call's rows are written.

A cache's `length` is a scalar when every row is filled alike (a prompt batch and the decoding
loop that follows it: `generate`), or one fill level per row (slot-based serving, where each
row is a request of its own that joined at another step: inference/batching.py). Per-row
levels take one token per row per call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from avllm_jax.models import layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for `max_length` slots; a row's slots at or after its
    length are empty.

    One array per layer, heads before slots. Decoding then writes each token in place and the
    attention matmuls read the arrays as they are. A stacked [L, B, max_length, G, D] array was
    copied whole at every step (the layer scan slices it) and transposed for the matmuls.
    """

    keys: tuple[jax.Array, ...]  # per layer [B, G, max_length, D]
    values: tuple[jax.Array, ...]  # per layer [B, G, max_length, D]
    segment_ids: jax.Array  # [B, max_length]; 0 for empty slots and padding
    length: jax.Array  # int32 scalar, or int32 [B]: slots filled so far

    @classmethod
    def create(cls, config, batch_size: int, max_length: int, dtype=None, *, per_row: bool = False) -> KVCache:
        """An empty cache for a LlamaConfig; `per_row`: a fill level per row."""
        dtype = dtype or layers.dtype_of(config.dtype)
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
            length=jnp.zeros((batch_size,) if per_row else (), jnp.int32),
        )

    @property
    def per_row(self) -> bool:
        return self.length.ndim == 1

    def padded(self, max_length: int) -> KVCache:
        """This cache with empty slots added up to `max_length` (a copy of every array)."""
        extra = max_length - self.segment_ids.shape[1]
        pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
        return KVCache(
            tuple(pad(k, 2) for k in self.keys),
            tuple(pad(v, 2) for v in self.values),
            pad(self.segment_ids, 1),
            self.length,
        )


def write_keys(cached: jax.Array, new: jax.Array, at: jax.Array) -> jax.Array:
    """`cached` [B, G, max_length, D] with `new` [B, S, G, D] written from slot `at`: a scalar
    (every row alike), or [B] (S is 1: each row's token at its own slot)."""
    new = new.astype(cached.dtype).transpose(0, 2, 1, 3)
    if jnp.ndim(at) == 0:
        return jax.lax.dynamic_update_slice(cached, new, (0, 0, at, 0))
    return cached.at[jnp.arange(cached.shape[0]), :, at].set(new[:, :, 0])


def write_segment_ids(cached: jax.Array, new: jax.Array, at: jax.Array) -> jax.Array:
    """`cached` [B, max_length] with `new` [B, S] written from slot `at`, as `write_keys`."""
    new = new.astype(jnp.int32)
    if jnp.ndim(at) == 0:
        return jax.lax.dynamic_update_slice(cached, new, (0, at))
    return cached.at[jnp.arange(cached.shape[0]), at].set(new[:, 0])
