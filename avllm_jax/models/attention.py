"""Attention for CLIP and LLaMA: one function, `dot_product_attention`, over several kernels.
(HTSAT's window attention, with its additive relative-position bias and shift mask, is
computed in `models/swin.py`: segment ids cannot express it.)

Layout is [batch, sequence, heads, head_dim] for queries, keys and values. Keys and values may
have fewer heads than queries (grouped-query attention); each group of queries shares one head.

Masking is expressed with segment ids, the form the fused kernels take: a query attends to a
key only when their segment ids are equal (and, when causal, the key is not later than the
query). Real tokens carry segment 1 (or one id per packed sequence); padding and the rows of an
absent modality carry 0. Those rows then only see each other: their outputs are never read by
real tokens, and no row has an empty softmax, so nothing is NaN.

Implementations (the config field `attention_implementation`):
  'xla'     the reference: einsums and a boolean mask; runs everywhere.
  'cudnn'   cuDNN fused attention through `jax.nn.dot_product_attention` (NVIDIA GPUs,
            bfloat16/float16 only).
  'pallas'  Pallas flash attention: the Triton kernel of `jax.experimental.pallas.ops.gpu` on
            GPUs, splash attention on TPUs, and the GPU kernel in interpret mode on CPU (slow;
            it exists so that tests can check the kernel against 'xla').
  'auto'    'cudnn' on NVIDIA GPUs, 'pallas' (splash) on TPUs, 'xla' elsewhere; 'xla' also
            for single-token decoding and for float32 inputs on NVIDIA GPUs, which cuDNN does
            not take.
"""

from __future__ import annotations

import functools
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")

# Segment id of the slots added to reach a multiple of a kernel's block size. It differs from
# every real id (>= 0), so real rows never see padded keys; padded rows see each other, so no
# padded row has an empty softmax (which would give NaN inside the kernels' backward pass).
_PAD_SEGMENT = int(np.iinfo(np.int32).min)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_BATCH_MESH_AXES = ("data", "fsdp")
_HEAD_MESH_AXIS = "tensor"

_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def _backend():
    """('nvidia', 'tpu', 'gpu' for a non-NVIDIA GPU, or 'cpu'), and the device the program is
    compiled for: the mesh's when one is set (`jax.set_mesh`, or the abstract mesh of a target
    compiled ahead of time, as `avllm_jax.plan` does for a TPU from a CPU host), else this
    process's first device. Both have `platform` and `device_kind`."""
    mesh = jax.sharding.get_abstract_mesh()
    device = mesh.abstract_device if not mesh.empty and mesh.abstract_device is not None else jax.devices()[0]
    if device.platform == "gpu":
        # An abstract device has only its kind: 'NVIDIA H100 80GB HBM3', 'Tesla V100-SXM2-16GB'.
        return ("nvidia" if device.device_kind.startswith(("NVIDIA", "Tesla")) else "gpu"), device
    return device.platform, device


def resolve_implementation(name: str) -> str:
    """The concrete implementation `name` means on this machine: 'xla', 'cudnn' or 'pallas'.

    Prints the choice and the backend found, once per name. Raises ValueError for an unknown
    name, and for 'cudnn' without an NVIDIA GPU.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
    backend, device = _backend()
    if name == "cudnn" and backend != "nvidia":
        raise ValueError(
            f"attention implementation 'cudnn' needs an NVIDIA GPU, but JAX found {device.platform!r} "
            f"devices ({device.device_kind}); use 'xla', 'pallas' or 'auto' here"
        )
    if name == "auto":
        choice = {"nvidia": "cudnn", "tpu": "pallas"}.get(backend, "xla")
    else:
        choice = name
    kernel = {"tpu": "splash attention", "cpu": "GPU flash kernel in interpret mode"}.get(backend, "GPU flash kernel")
    detail = f" ({kernel})" if choice == "pallas" else ""
    _log_once(f"attention: implementation {name!r} -> {choice!r}{detail} on {backend} ({device.device_kind})")
    return choice


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
      implementation: see IMPLEMENTATIONS. The Pallas kernels compute self-attention only
        (Sq == Skv, query_offset the constant 0; on GPU also one segment-id array for both
        sides); for other calls 'pallas' computes with 'xla' and says so once.
    Returns: [B, Sq, H, D] in the query's dtype.
    """
    if (query_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both query_segment_ids and kv_segment_ids, or neither")
    num_heads, num_kv_heads = query.shape[2], key.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    choice = resolve_implementation(implementation)
    if implementation == "auto" and (query.shape[1] == 1 or (choice == "cudnn" and query.dtype not in _CUDNN_DTYPES)):
        # Decoding one token is memory bound, so a fused kernel gains nothing; cuDNN takes only
        # 16-bit floats.
        choice = "xla"

    if choice == "cudnn":
        return _cudnn_attention(query, key, value, query_segment_ids, kv_segment_ids, causal, query_offset)
    if choice == "pallas":
        backend, _ = _backend()
        reason = _pallas_unsupported(backend, query, key, query_segment_ids, kv_segment_ids, query_offset)
        if reason is None:
            if backend == "tpu":
                return _splash_attention(query, key, value, query_segment_ids, kv_segment_ids, causal)
            return _flash_attention_gpu(query, key, value, query_segment_ids, causal, interpret=backend == "cpu")
        _log_once(f"attention: 'pallas' computes this call with 'xla': {reason}")
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
        if kv_segment_ids is None:
            raise ValueError("query_segment_ids need kv_segment_ids")
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


def _is_static_zero(offset) -> bool:
    return isinstance(offset, (int, np.integer)) and offset == 0


def _cudnn_attention(query, key, value, query_segment_ids, kv_segment_ids, causal, query_offset):
    # Segment ids go to cuDNN as a boolean mask (which JAX turns into an additive [B, 1, Sq, Skv]
    # bias). Sequence lengths would be cheaper but only describe trailing padding, and the rows
    # of an absent modality sit in the middle of a sample, so only a mask is correct in general.
    # cuDNN's own causal mask is used for self-attention; a shifted causal mask (decoding with
    # a KV cache) is folded into the boolean mask instead.
    if query.dtype not in _CUDNN_DTYPES:
        raise ValueError(
            f"attention implementation 'cudnn' takes bfloat16 or float16 inputs, got {query.dtype}; "
            "use 'xla' or 'auto' for float32"
        )
    query_length, kv_length = query.shape[1], key.shape[1]
    cudnn_causal = causal and query_length == kv_length and _is_static_zero(query_offset)
    mask = None
    if query_segment_ids is not None or (causal and not cudnn_causal):
        mask = attention_mask(
            query_length,
            kv_length,
            query_segment_ids,
            kv_segment_ids,
            causal=causal and not cudnn_causal,
            query_offset=query_offset,
        )
        # cuDNN's backward with a bias needs even sequence lengths: pad by one slot if needed.
        pad_q, pad_kv = query_length % 2, kv_length % 2
        if pad_q or pad_kv:
            query = jnp.pad(query, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
            key, value = (jnp.pad(x, ((0, 0), (0, pad_kv), (0, 0), (0, 0))) for x in (key, value))
            # Padded queries see everything (their output is dropped); padded keys are seen by
            # nothing but padded queries.
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, pad_kv)), constant_values=False)
            if pad_q:
                mask = mask.at[:, :, query_length:, :].set(True)
    output = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=cudnn_causal, implementation="cudnn")
    return output[:, :query_length]


def _pallas_unsupported(backend, query, key, query_segment_ids, kv_segment_ids, query_offset) -> str | None:
    """Why the Pallas kernels cannot compute this call, or None when they can."""
    if query.shape[1] != key.shape[1]:
        return f"query length {query.shape[1]} differs from key length {key.shape[1]}"
    if not _is_static_zero(query_offset):
        return "query_offset is not the constant 0"
    if backend != "tpu" and query_segment_ids is not kv_segment_ids:
        # The GPU kernel takes one segment-id array for queries and keys alike.
        return "query and key segment ids are different arrays"
    return None


def _pad_sequence(arrays, segment_ids, multiple):
    """Pad [B, S, ...] arrays along S to a multiple of `multiple`, padded slots in _PAD_SEGMENT.

    Returns the padded arrays and segment ids (None stays None when nothing is padded).
    """
    batch, length = arrays[0].shape[:2]
    padding = -length % multiple
    if not padding:
        return arrays, segment_ids
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padding)), constant_values=_PAD_SEGMENT)
    arrays = [jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2)) for x in arrays]
    return arrays, segment_ids


def _shard_over_mesh(kernel, query, key, value, *segment_ids):
    """Run `kernel(query, key, value, *segment_ids)` per device with shard_map when a mesh is set.

    A Pallas call is opaque to XLA's partitioner, which would gather its inputs onto every
    device. Attention is independent per sample and per head, so each device computes its own
    shard: batch over ('data', 'fsdp') and heads over 'tensor', as far as the sizes divide.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(query, key, value, *segment_ids)
    batch_axes, batch_shards = [], 1
    for axis in _BATCH_MESH_AXES:
        if axis in mesh.axis_names and query.shape[0] % (batch_shards * mesh.shape[axis]) == 0:
            batch_axes.append(axis)
            batch_shards *= mesh.shape[axis]
    head_axis = None
    if _HEAD_MESH_AXIS in mesh.axis_names and query.shape[2] % mesh.shape[_HEAD_MESH_AXIS] == 0:
        head_axis = _HEAD_MESH_AXIS
        if key.shape[2] % mesh.shape[head_axis]:
            # Fewer key/value heads than head shards: give every query head its own copy.
            repeats = query.shape[2] // key.shape[2]
            key, value = jnp.repeat(key, repeats, axis=2), jnp.repeat(value, repeats, axis=2)
    batch_spec = tuple(batch_axes) or None
    heads_spec = P(batch_spec, None, head_axis, None)
    segment_spec = P(batch_spec, None)
    return jax.shard_map(
        kernel,
        in_specs=(heads_spec, heads_spec, heads_spec) + (segment_spec,) * len(segment_ids),
        out_specs=heads_spec,
        check_vma=False,
    )(query, key, value, *segment_ids)


def _flash_block_size(length: int) -> int:
    # Triton tiles are powers of two; 128 suits head_dim 128 on A100/H100-class GPUs.
    return min(128, max(16, 1 << (length - 1).bit_length()))


def _flash_attention_gpu(query, key, value, segment_ids, causal, *, interpret, block_size=None):
    """The Pallas (Triton) flash-attention kernel, forward and backward.

    segment_ids: [B, S] for queries and keys alike, or None. Sequences are padded to a
    multiple of the block size; key/value heads are repeated for grouped-query attention
    (the kernel has no grouped form; its backward sums the copies' gradients).
    """
    with warnings.catch_warnings():
        # jax >= 0.11 deprecates this module in favour of tokamax, which is not a dependency here.
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    length, head_dim = query.shape[1], query.shape[3]
    block = block_size or _flash_block_size(length)
    block_sizes = gpu_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=min(32, block),
        block_kv_dkv=min(32, block),
        block_q_dq=min(32, block),
        block_kv_dq=min(32, block),
    )

    def kernel(query, key, value, *segment_ids):
        segment_ids = segment_ids[0] if segment_ids else None
        repeats = query.shape[2] // key.shape[2]
        if repeats > 1:
            key, value = jnp.repeat(key, repeats, axis=2), jnp.repeat(value, repeats, axis=2)
        (query, key, value), segment_ids = _pad_sequence([query, key, value], segment_ids, block)
        output = gpu_attention.mha(
            query,
            key,
            value,
            segment_ids,
            sm_scale=head_dim**-0.5,
            causal=causal,
            block_sizes=block_sizes,
            interpret=interpret,
        )
        return output[:, :length]

    extra = () if segment_ids is None else (segment_ids,)
    return _shard_over_mesh(kernel, query, key, value, *extra)


@functools.cache
def _splash_kernel(length: int, num_heads: int, causal: bool, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (length, length)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    block_sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # Built with concrete arrays (not tracers of the first caller's trace), since it is cached.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(
            splash.MultiHeadMask([head_mask] * num_heads),
            block_sizes=block_sizes,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _splash_attention(query, key, value, query_segment_ids, kv_segment_ids, causal, *, interpret=False):
    """TPU splash attention (grouped-query natively), vmapped over the batch, per device."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    length, head_dim = query.shape[1], query.shape[3]
    # TPU tiles are multiples of 128 lanes; larger blocks amortise the per-block overhead.
    padded_length = length + (-length % 128)
    block = next(b for b in (512, 256, 128) if padded_length % b == 0)

    def kernel(query, key, value, *segment_ids):
        query_ids, kv_ids = segment_ids if segment_ids else (None, None)
        (query,), query_ids = _pad_sequence([query], query_ids, block)
        (key, value), kv_ids = _pad_sequence([key, value], kv_ids, block)
        splash_kernel = _splash_kernel(query.shape[1], query.shape[2], causal, block, interpret)
        # Splash takes [heads, sequence, head_dim] per sample and does not scale the logits.
        query = (query * head_dim**-0.5).astype(key.dtype).transpose(0, 2, 1, 3)
        key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
        if query_ids is None:
            output = jax.vmap(splash_kernel)(query, key, value)
        else:
            ids = splash.SegmentIds(q=query_ids, kv=kv_ids)
            output = jax.vmap(lambda q, k, v, ids: splash_kernel(q, k, v, segment_ids=ids))(query, key, value, ids)
        return output.transpose(0, 2, 1, 3)[:, :length]

    extra = () if query_segment_ids is None else (query_segment_ids, kv_segment_ids)
    return _shard_over_mesh(kernel, query, key, value, *extra)
