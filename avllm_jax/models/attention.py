"""The one attention function every model calls.

Layout is [batch, sequence, heads, head_dim] for queries, keys and values. Keys and values may
have fewer heads than queries (grouped-query attention); each group of queries shares one head.

Masking is expressed with segment ids, the form the fused kernels take: a query attends to a
key only when their segment ids are equal (and, when causal, the key is not later than the
query). Real tokens carry segment 1 (or one id per packed sequence); padding and the rows of an
absent modality carry 0. Those rows then only see each other: their outputs are never read by
real tokens, and no row has an empty softmax, so nothing is NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    query_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = False,
    query_offset: int | jax.Array = 0,
    implementation: str = "xla",
) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v.

    Args:
      query: [B, Sq, H, D]; key, value: [B, Skv, G, D] with H a multiple of G.
      query_segment_ids: int [B, Sq]; kv_segment_ids: int [B, Skv]. Both or neither.
      causal: mask keys whose slot index is after the query's.
      query_offset: slot index of query row 0 among the keys (the KV-cache fill level when
        decoding; 0 for a full forward).
      implementation: see IMPLEMENTATIONS.
    Returns: [B, Sq, H, D] in the query's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if (query_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both query_segment_ids and kv_segment_ids, or neither")
    num_heads, num_kv_heads = query.shape[2], key.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    mask = attention_mask(
        query.shape[1], key.shape[1], query_segment_ids, kv_segment_ids, causal=causal, query_offset=query_offset
    )
    return _xla_attention(query, key, value, mask)


def attention_mask(
    query_length: int,
    kv_length: int,
    query_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    causal: bool,
    query_offset: int | jax.Array = 0,
) -> jax.Array | None:
    """Boolean [B or 1, 1, Sq, Skv] mask, True where a query may attend to a key; None for no mask."""
    mask = None
    if causal:
        query_slots = jnp.arange(query_length)[:, None] + query_offset
        mask = (jnp.arange(kv_length)[None, :] <= query_slots)[None, None]
    if query_segment_ids is not None:
        same_segment = (query_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        mask = same_segment if mask is None else mask & same_segment
    return mask


def _xla_attention(query, key, value, mask):
    batch, query_length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    # Group the query heads that share a key/value head: [B, Sq, G, H/G, D].
    grouped_query = query.reshape(batch, query_length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bqgrd,bkgd->bgrqk", grouped_query, key, preferred_element_type=jnp.float32)
    logits = logits * (head_dim**-0.5)
    if mask is not None:
        # A large finite value rather than -inf: exp() underflows to exactly 0, and no row is NaN.
        mask = mask[:, :, None]  # broadcast over the heads within a group
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    output = jnp.einsum("bgrqk,bkgd->bqgrd", weights, value)
    return output.reshape(batch, query_length, num_heads, head_dim)
