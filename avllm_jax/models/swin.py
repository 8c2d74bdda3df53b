"""The Swin Transformer stages of HTSAT: window attention with a relative position bias,
every second block on windows cyclically shifted by half a window (with a mask that keeps
the wrapped-around regions apart), and 2x2 patch merging between stages.

A stage's blocks are stacked on a leading axis and run with `jax.lax.scan`
(`layers.scan_layers`). A block's shift is a per-layer input of the scan (0 for even blocks,
1 for odd ones) that scales the roll and the shift mask, so one scanned body serves both
kinds of block and odd depths.

Attention is computed here rather than through `models/attention.py`: Swin attention runs
over many small windows (64 tokens) with an additive per-head relative position bias and an
additive per-window mask, which the shared function's segment-id interface does not express.
It is a plain einsum with the softmax in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avllm_jax.models.layers import Dense, LayerNorm, constrain, param, scan_layers, stacked

SHIFT_MASK_VALUE = -100.0  # what Swin adds between regions that a cyclic shift brought together
# Logical names of a [B, H, W, C] feature map and of its MLP's hidden units.
MAP = ("batch", None, None, "activation_embed")
MAP_MLP = ("batch", None, None, "mlp")


class SwinBlock(nnx.Module):
    """Window attention then MLP, both pre-norm residual, on [B, H, W, C]."""

    def __init__(self, width, heads, window, shift, *, mlp_ratio, qkv_bias, eps, param_dtype, rngs: nnx.Rngs):
        dense = functools.partial(Dense, param_dtype=param_dtype, rngs=rngs)
        norm = functools.partial(LayerNorm, eps=eps, param_dtype=param_dtype, rngs=rngs)
        hidden = int(mlp_ratio * width)
        self.attn_norm = norm(width)
        self.query = dense(width, width, ("embed", "heads"), bias=qkv_bias)
        self.key = dense(width, width, ("embed", "heads"), bias=qkv_bias)
        self.value = dense(width, width, ("embed", "heads"), bias=qkv_bias)
        self.relative_position_bias = param(
            rngs, ((2 * window - 1) ** 2, heads), (None, None), dtype=param_dtype, init="zeros"
        )
        self.attn_out = dense(width, width, ("heads", "embed"))
        self.mlp_norm = norm(width)
        self.mlp_in = dense(width, hidden, ("embed", "mlp"))
        self.mlp_out = dense(hidden, width, ("mlp", "embed"))
        self.heads, self.window, self.shift = heads, window, shift

    def __call__(self, x, shifted):
        """`shifted` (0 or 1, traced) turns on this block's cyclic shift and its mask."""
        batch, height, width, channels = x.shape
        window, shift = self.window, self.shift * shifted
        x = constrain(x, MAP)
        h = self.attn_norm(x)
        h = jnp.pad(h, ((0, 0), (0, -height % window), (0, -width % window), (0, 0)))
        padded_height, padded_width = h.shape[1:3]
        h = jnp.roll(h, (-shift, -shift), axis=(1, 2))
        rows, cols = padded_height // window, padded_width // window
        h = h.reshape(batch, rows, window, cols, window, channels).transpose(0, 1, 3, 2, 4, 5)
        h = h.reshape(batch, rows * cols, window * window, channels)
        bias = self.relative_position_bias[...][_relative_position_index(window)]  # [N, N, heads]
        mask = _shift_mask(padded_height, padded_width, window, self.shift) * shifted  # [windows, N, N]
        h = self._attention(h, bias.transpose(2, 0, 1)[None, None] + mask[None, :, None])
        h = h.reshape(batch, rows, cols, window, window, channels).transpose(0, 1, 3, 2, 4, 5)
        h = h.reshape(batch, padded_height, padded_width, channels)
        h = jnp.roll(h, (shift, shift), axis=(1, 2))[:, :height, :width]
        x = constrain(x + h, MAP)
        hidden = constrain(jax.nn.gelu(self.mlp_in(self.mlp_norm(x)), approximate=False), MAP_MLP)
        return constrain(x + self.mlp_out(hidden), MAP)

    def _attention(self, windows, additive):
        """windows [B, W, N, C]; additive [B | 1, W, heads, N, N] bias and mask."""
        *lead, channels = windows.shape
        split = lambda t: t.reshape(*lead, self.heads, channels // self.heads)
        query, key, value = split(self.query(windows)), split(self.key(windows)), split(self.value(windows))
        scores = jnp.einsum("bwqhd,bwkhd->bwhqk", query, key, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(channels // self.heads) + additive.astype(jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, value)
        return self.attn_out(out.reshape(*lead, channels))


class Stage(nnx.Module):
    """`depth` Swin blocks on a [B, H, W, width] map of `resolution`, then (if `merge`) 2x2
    patch merging to [B, H/2, W/2, 2 * width]."""

    def __init__(
        self,
        width,
        resolution,
        depth,
        heads,
        *,
        window_size,
        merge,
        mlp_ratio,
        qkv_bias,
        eps,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        # A stage no larger than one window attends over all of it, unshifted (as Swin does).
        fits_one_window = min(resolution) <= window_size
        window = min(resolution) if fits_one_window else window_size
        shift = 0 if fits_one_window else window_size // 2
        self.depth = depth
        block = functools.partial(
            SwinBlock,
            width,
            heads,
            window,
            shift,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            eps=eps,
            param_dtype=param_dtype,
        )
        self.blocks = stacked(depth, lambda r: block(rngs=r), rngs)
        if merge:
            self.merge_norm: LayerNorm | None = LayerNorm(4 * width, eps=eps, param_dtype=param_dtype, rngs=rngs)
            self.merge: Dense | None = Dense(
                4 * width, 2 * width, (None, "embed"), bias=False, param_dtype=param_dtype, rngs=rngs
            )
        else:
            self.merge_norm = self.merge = None

    def __call__(self, x):
        shifted = jnp.arange(self.depth) % 2  # blocks alternate unshifted, shifted
        x, _ = scan_layers(self.blocks, x, shifted, call=lambda block, h, s: (block(h, s), None))
        if self.merge is None:
            return x
        x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        return self.merge(self.merge_norm(x))


@functools.cache
def _relative_position_index(window: int) -> np.ndarray:
    """[N, N] row of the bias table for each (query, key) pair of a window's N = window^2 positions."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    delta = coords[:, :, None] - coords[:, None, :] + window - 1  # [2, N, N], each in [0, 2w-2]
    return delta[0] * (2 * window - 1) + delta[1]


@functools.cache
def _shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """[windows, N, N] additive mask for a cyclically shifted map: after the roll, the last
    window of each row/column holds pieces from opposite edges; they must not attend to each other."""
    if shift == 0:
        return np.zeros(((height // window) * (width // window), window * window, window * window), np.float32)

    def regions(size):
        index = np.arange(size)
        return (index >= size - window).astype(int) + (index >= size - shift)

    region = regions(height)[:, None] * 3 + regions(width)[None, :]
    region = region.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    region = region.reshape(-1, window * window)
    return np.where(region[:, :, None] != region[:, None, :], SHIFT_MASK_VALUE, 0.0).astype(np.float32)
