"""HTSAT, the audio encoder of CLAP (laion/clap-htsat-unfused and -fused), in Flax NNX.

Input: CLAP log-mel features [B, C, frames, 64] (`data/features.py`; C = 4 for the fused
model, 1 otherwise). The model normalises each mel bin (a frozen BatchNorm), stretches the
frames to `spec_size * freq_ratio` (bicubic), folds the spectrogram into a square image (time
cut into `freq_ratio` pieces stacked along the frequency axis), embeds 4x4 patches and runs a
Swin Transformer: stages of window attention with a relative position bias, every second
block on windows shifted by half a window (with a mask that keeps the wrapped-around regions
apart), and patch merging between stages. Output: the mean over the last stage's positions,
the 768-d embedding CLAP projects (and the paper's E_a row), and on request the last hidden
state. The fused model adds attentional feature fusion (AFF): the three window-long crops are
embedded with a wider kernel and mixed into the patches of the shrunk whole clip, for the
segments flagged `is_longer`; it is computed for every segment and selected per segment,
so that shapes stay static.

Structure: stages differ in width, so they are a Python loop of 4; the blocks of a stage are
stacked on a leading axis and run with `jax.lax.scan` (`layers.scan_layers`). A block's
shift is a per-layer input of the scan (0 for even blocks, 1 for odd ones) that scales the
roll and the shift mask, so one scanned body serves both kinds of block and odd depths.

Attention is computed here rather than through `models/attention.py`: Swin attention runs
over many small windows (64 tokens) with an additive per-head relative position bias and an
additive per-window mask, which the shared function's segment-id interface does not express.
It is a plain einsum with the softmax in float32.

Weights: `hf_rules` maps a `ClapAudioModel` or `ClapModel` checkpoint (text tower and
projections dropped on purpose); `HTSATConfig.from_hf` reads its config.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avllm_jax.models.conversion import Rule, transpose
from avllm_jax.models.layers import dtype_of, layer_norm, param, scan_layers, stacked

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which CLAP keeps
SHIFT_MASK_VALUE = -100.0  # what Swin adds between regions that a cyclic shift brought together


@dataclasses.dataclass(frozen=True)
class HTSATConfig:
    num_mel_bins: int = 64
    spec_size: int = 256
    patch_size: tuple[int, int] = (4, 4)
    patch_stride: tuple[int, int] = (4, 4)
    window_size: int = 8
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    patch_layer_norm: bool = True
    enable_fusion: bool = False
    fusion_reduction: int = 4  # channel reduction inside the AFF block
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"

    def __post_init__(self):
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        if self.freq_ratio < 1:
            raise ValueError(f"spec_size {self.spec_size} is smaller than num_mel_bins {self.num_mel_bins}")
        for stage, (resolution, heads) in enumerate(zip(self.resolutions, self.num_heads)):
            if min(resolution) < self.window_size:
                raise ValueError(
                    f"stage {stage} works on {resolution[0]}x{resolution[1]} patches, fewer than "
                    f"window_size={self.window_size}; use a smaller window or fewer stages"
                )
            if self.embed_dim * 2**stage % heads:
                raise ValueError(f"stage {stage}: width {self.embed_dim * 2**stage} is not a multiple of {heads} heads")

    @property
    def freq_ratio(self) -> int:
        return self.spec_size // self.num_mel_bins

    @property
    def num_features(self) -> int:
        """Width of the output (768 for CLAP)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        grid = (self.spec_size // self.patch_stride[0], self.spec_size // self.patch_stride[1])
        return [(grid[0] // 2**i, grid[1] // 2**i) for i in range(len(self.depths))]

    @classmethod
    def from_hf(cls, config: dict, **overrides) -> HTSATConfig:
        """From the dict of a ClapConfig (its 'audio_config') or of a bare ClapAudioConfig."""
        config = config.get("audio_config", config)
        if config.get("enable_fusion") and config.get("fusion_type") == "channel_map":
            raise ValueError("HTSAT fusion_type 'channel_map' is not supported (CLAP checkpoints use 'aff_2d')")
        only_supported = {"patch_embed_input_channels": 1, "flatten_patch_embeds": True, "hidden_act": "gelu"}
        for key, supported in only_supported.items():
            if config.get(key, supported) != supported:
                raise ValueError(f"HTSAT config {key}={config[key]!r} is not supported (only {supported!r})")
        pair = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
        defaults = cls()
        return cls(
            num_mel_bins=config.get("num_mel_bins", defaults.num_mel_bins),
            spec_size=config.get("spec_size", defaults.spec_size),
            patch_size=pair(config.get("patch_size", defaults.patch_size)),
            patch_stride=pair(config.get("patch_stride", defaults.patch_stride)),
            window_size=config.get("window_size", defaults.window_size),
            embed_dim=config.get("patch_embeds_hidden_size", defaults.embed_dim),
            depths=tuple(config.get("depths", defaults.depths)),
            num_heads=tuple(config.get("num_attention_heads", defaults.num_heads)),
            mlp_ratio=config.get("mlp_ratio", defaults.mlp_ratio),
            qkv_bias=config.get("qkv_bias", defaults.qkv_bias),
            layer_norm_eps=config.get("layer_norm_eps", defaults.layer_norm_eps),
            patch_layer_norm=config.get("enable_patch_layer_norm", defaults.patch_layer_norm),
            enable_fusion=config.get("enable_fusion", defaults.enable_fusion),
            fusion_reduction=config.get("aff_block_r", defaults.fusion_reduction),
            **overrides,
        )


CLAP_HTSAT_UNFUSED = HTSATConfig()
CLAP_HTSAT_FUSED = HTSATConfig(enable_fusion=True)


class Dense(nnx.Module):
    """x @ kernel + bias; also a 1x1 convolution over the channels-last axis."""

    def __init__(self, features_in, features_out, axes, *, bias=True, config: HTSATConfig, rngs: nnx.Rngs):
        dtype = dtype_of(config.param_dtype)
        self.kernel = param(rngs, (features_in, features_out), axes, dtype=dtype, stddev=features_in**-0.5)
        self.bias = param(rngs, (features_out,), (axes[1],), dtype=dtype, init="zeros") if bias else None

    def __call__(self, x):
        y = x @ self.kernel[...].astype(x.dtype)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Conv(nnx.Module):
    """A 2-D convolution over [B, H, W, C_in] with an HWIO kernel."""

    def __init__(self, channels_in, channels_out, size, stride, *, config: HTSATConfig, rngs: nnx.Rngs):
        dtype = dtype_of(config.param_dtype)
        fan_in = channels_in * size[0] * size[1]
        self.kernel = param(
            rngs, (*size, channels_in, channels_out), (None, None, None, "embed"), dtype=dtype, stddev=fan_in**-0.5
        )
        self.bias = param(rngs, (channels_out,), ("embed",), dtype=dtype, init="zeros")
        self.stride = tuple(stride)
        self.padding = tuple(((k - s) // 2, (k - s) // 2) for k, s in zip(size, stride))

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), self.stride, self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + self.bias[...].astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, features, *, eps, config: HTSATConfig, rngs: nnx.Rngs):
        dtype = dtype_of(config.param_dtype)
        self.scale = param(rngs, (features,), (None,), dtype=dtype, init="ones")
        self.bias = param(rngs, (features,), (None,), dtype=dtype, init="zeros")
        self.eps = eps

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class BatchNorm(nnx.Module):
    """Inference-mode batch norm over the last axis, with the checkpoint's running statistics."""

    def __init__(self, features, *, config: HTSATConfig, rngs: nnx.Rngs):
        dtype = dtype_of(config.param_dtype)
        self.scale = param(rngs, (features,), (None,), dtype=dtype, init="ones")
        self.bias = param(rngs, (features,), (None,), dtype=dtype, init="zeros")
        self.mean = nnx.BatchStat(jnp.zeros((features,), dtype))
        self.var = nnx.BatchStat(jnp.ones((features,), dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        scale = self.scale[...].astype(jnp.float32) * jax.lax.rsqrt(self.var[...].astype(jnp.float32) + BATCH_NORM_EPS)
        y = (x32 - self.mean[...].astype(jnp.float32)) * scale + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class FeatureFusion(nnx.Module):
    """CLAP's 2-D attentional feature fusion: a sigmoid gate, from a per-position (local) and a
    pooled (global) bottleneck of global + local, chooses between the two inputs."""

    def __init__(self, config: HTSATConfig, *, rngs: nnx.Rngs):
        width, inner = config.embed_dim, config.embed_dim // config.fusion_reduction
        dense = functools.partial(Dense, config=config, rngs=rngs)
        norm = functools.partial(BatchNorm, config=config, rngs=rngs)
        self.local_in, self.local_in_norm = dense(width, inner, ("embed", None)), norm(inner)
        self.local_out, self.local_out_norm = dense(inner, width, (None, "embed")), norm(width)
        self.global_in, self.global_in_norm = dense(width, inner, ("embed", None)), norm(inner)
        self.global_out, self.global_out_norm = dense(inner, width, (None, "embed")), norm(width)

    def __call__(self, global_patches, local_patches):
        mixed = global_patches + local_patches
        local_gate = self.local_out_norm(self.local_out(jax.nn.relu(self.local_in_norm(self.local_in(mixed)))))
        pooled = jnp.mean(mixed, axis=(1, 2), keepdims=True)
        global_gate = self.global_out_norm(self.global_out(jax.nn.relu(self.global_in_norm(self.global_in(pooled)))))
        gate = jax.nn.sigmoid(local_gate + global_gate)
        return 2.0 * global_patches * gate + 2.0 * local_patches * (1.0 - gate)


class SwinBlock(nnx.Module):
    """Window attention then MLP, both pre-norm residual, on [B, H, W, C]."""

    def __init__(self, width, heads, window, shift, config: HTSATConfig, *, rngs: nnx.Rngs):
        dense = functools.partial(Dense, config=config, rngs=rngs)
        norm = functools.partial(LayerNorm, eps=config.layer_norm_eps, config=config, rngs=rngs)
        hidden = int(config.mlp_ratio * width)
        self.attn_norm = norm(width)
        self.query = dense(width, width, ("embed", "heads"), bias=config.qkv_bias)
        self.key = dense(width, width, ("embed", "heads"), bias=config.qkv_bias)
        self.value = dense(width, width, ("embed", "heads"), bias=config.qkv_bias)
        self.relative_position_bias = param(
            rngs, ((2 * window - 1) ** 2, heads), (None, None), dtype=dtype_of(config.param_dtype), init="zeros"
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
        x = x + h
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x)), approximate=False))

    def _attention(self, windows, additive):
        """windows [B, W, N, C]; additive [B | 1, W, heads, N, N] bias and mask."""
        *lead, channels = windows.shape
        split = lambda t: t.reshape(*lead, self.heads, channels // self.heads)  # noqa: E731
        query, key, value = split(self.query(windows)), split(self.key(windows)), split(self.value(windows))
        scores = jnp.einsum("bwqhd,bwkhd->bwhqk", query, key, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(channels // self.heads) + additive.astype(jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, value)
        return self.attn_out(out.reshape(*lead, channels))


class Stage(nnx.Module):
    """Swin blocks at one resolution, then (except in the last stage) 2x2 patch merging."""

    def __init__(self, index: int, config: HTSATConfig, *, rngs: nnx.Rngs):
        width, resolution = config.embed_dim * 2**index, config.resolutions[index]
        # A stage no larger than one window attends over all of it, unshifted (as Swin does).
        fits_one_window = min(resolution) <= config.window_size
        window = min(resolution) if fits_one_window else config.window_size
        shift = 0 if fits_one_window else config.window_size // 2
        self.depth = config.depths[index]
        self.blocks = stacked(
            self.depth, lambda r: SwinBlock(width, config.num_heads[index], window, shift, config, rngs=r), rngs
        )
        if index < len(config.depths) - 1:
            self.merge_norm = LayerNorm(4 * width, eps=config.layer_norm_eps, config=config, rngs=rngs)
            self.merge = Dense(4 * width, 2 * width, (None, "embed"), bias=False, config=config, rngs=rngs)
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


class HTSAT(nnx.Module):
    def __init__(self, config: HTSATConfig, *, rngs: nnx.Rngs):
        self.config = config
        width = config.embed_dim
        self.mel_norm = BatchNorm(config.num_mel_bins, config=config, rngs=rngs)
        self.patch_embed = Conv(1, width, config.patch_size, config.patch_stride, config=config, rngs=rngs)
        if config.enable_fusion:
            # the crops are embedded with a kernel 3x wider in time, then laid side by side
            wide = lambda size: (size[0], 3 * size[1])  # noqa: E731
            self.fusion_embed = Conv(
                1, width, wide(config.patch_size), wide(config.patch_stride), config=config, rngs=rngs
            )
            self.fusion = FeatureFusion(config, rngs=rngs)
        else:
            self.fusion_embed = self.fusion = None
        norm = functools.partial(LayerNorm, eps=config.layer_norm_eps, config=config, rngs=rngs)
        self.patch_norm = norm(width) if config.patch_layer_norm else None
        self.stages = nnx.List([Stage(i, config, rngs=rngs) for i in range(len(config.depths))])
        self.norm = norm(config.num_features)

    def __call__(self, features, is_longer=None, *, return_last_hidden_state=False):
        """features [B, C, frames, mel] (C = 4 fused, 1 unfused); is_longer bool [B] (fused only).

        Returns pooled [B, num_features] and, if asked, last_hidden_state
        [B, F', T', num_features]: HF's `last_hidden_state` [B, num_features, F', T'] channels-last.
        """
        config = self.config
        channels = 4 if config.enable_fusion else 1
        if features.ndim != 4 or features.shape[1] != channels or features.shape[3] != config.num_mel_bins:
            raise ValueError(
                f"HTSAT ({'fused' if config.enable_fusion else 'unfused'}) takes features "
                f"[B, {channels}, frames, {config.num_mel_bins}], got {features.shape}"
            )
        if config.enable_fusion and is_longer is None:
            raise ValueError("the fused HTSAT needs is_longer [B] (from clap_audio_features)")
        image = self._spectrogram_image(self.mel_norm(features.astype(dtype_of(config.dtype))))
        x = self.patch_embed(image[..., :1])
        if config.enable_fusion:
            fused = self.fusion(x, self._crop_patches(image, x.shape[2]))
            x = jnp.where(jnp.reshape(is_longer, (-1, 1, 1, 1)), fused, x)
        if self.patch_norm is not None:
            x = self.patch_norm(x)
        for stage in self.stages:
            x = stage(x)
        x = self.norm(x)
        pooled = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)
        if not return_last_hidden_state:
            return pooled
        # undo the folding: rows of each time piece back side by side along time
        batch, height, width, channels = x.shape
        ratio = config.freq_ratio
        last = x.reshape(batch, ratio, height // ratio, width, channels).transpose(0, 2, 1, 3, 4)
        return pooled, last.reshape(batch, height // ratio, ratio * width, channels)

    def _spectrogram_image(self, mel):
        """[B, C, frames, mel] -> [B, S, S, C]: frames stretched to spec_size * freq_ratio, then cut
        into freq_ratio pieces stacked along frequency (piece j holds rows j*mel ... (j+1)*mel)."""
        config = self.config
        batch, channels, frames, bins = mel.shape
        ratio = config.freq_ratio
        target_frames, target_bins = config.spec_size * ratio, config.spec_size // ratio
        if frames > target_frames or bins > target_bins:
            raise ValueError(f"{frames} frames x {bins} mel bins do not fit HTSAT's {target_frames} x {target_bins}")
        if frames < target_frames:
            mel = jnp.einsum("ot,bctf->bcof", _bicubic_matrix(frames, target_frames).astype(mel.dtype), mel)
        if bins < target_bins:
            mel = jnp.einsum("of,bctf->bcto", _bicubic_matrix(bins, target_bins).astype(mel.dtype), mel)
        frames, bins = mel.shape[2:]
        image = mel.reshape(batch, channels, ratio, frames // ratio, bins).transpose(0, 2, 4, 3, 1)
        return image.reshape(batch, ratio * bins, frames // ratio, channels)

    def _crop_patches(self, image, patch_columns):
        """Embeds the three crops (channels 1..3) and lays them side by side in time, cut or
        zero-padded to the width of the global patch grid."""
        batch, height, width, _ = image.shape
        crops = image[..., 1:].transpose(0, 3, 1, 2).reshape(batch * 3, height, width, 1)
        patches = self.fusion_embed(crops)
        _, rows, columns, features = patches.shape
        patches = patches.reshape(batch, 3, rows, columns, features).transpose(0, 2, 1, 3, 4)
        patches = patches.reshape(batch, rows, 3 * columns, features)[:, :, :patch_columns]
        return jnp.pad(patches, ((0, 0), (0, 0), (0, patch_columns - patches.shape[2]), (0, 0)))


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


@functools.cache
def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bicubic resize (a = -0.75, align_corners=True, clamped
    edges). Source positions in float32 like torch's, which keeps the weights within 1e-7."""
    a = -0.75
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0.0)
    source = scale * np.arange(out_size, dtype=np.float32)
    base = np.floor(source).astype(int)
    t = (source - base).astype(np.float64)
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # noqa: E731  |d| <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # noqa: E731  1 < |d| < 2
    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    matrix = np.zeros((out_size, in_size), np.float32)
    for k in range(4):
        np.add.at(matrix, (np.arange(out_size), np.clip(base - 1 + k, 0, in_size - 1)), weights[:, k])
    return matrix


BATCH_NORM_NAMES = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


def _conv_kernel(x: np.ndarray) -> np.ndarray:
    """torch Conv2d [out, in, kh, kw] -> HWIO."""
    return x.transpose(2, 3, 1, 0)


def _pointwise_kernel(x: np.ndarray) -> np.ndarray:
    """torch 1x1 Conv2d [out, in, 1, 1] -> [in, out]."""
    return x[:, :, 0, 0].T


def hf_rules(config: HTSATConfig) -> list[Rule]:
    """Rules from the names of a ClapAudioModel / ClapModel checkpoint to our parameters."""
    encoder = r"(?:audio_model\.)?audio_encoder\."
    block = r"layers\.(?P<stage>\d+)\.blocks\.(?P<layer>\d+)\."
    ours = "stages.{stage}.blocks."
    rules = [
        # the rest of a ClapModel: text tower, projection heads, temperatures
        Rule(r"text_model\..*|text_projection\..*|audio_projection\..*|logit_scale_[at]", None),
        Rule(encoder + r".*num_batches_tracked", None),
        Rule(encoder + block + r"attention\.self\.relative_position_index", None),  # recomputed
        Rule(encoder + block + r"attention\.self\.relative_position_bias_table", ours + "relative_position_bias"),
        Rule(encoder + r"patch_embed\.proj\.weight", "patch_embed.kernel", _conv_kernel),
        Rule(encoder + r"patch_embed\.proj\.bias", "patch_embed.bias"),
    ]
    layer_norms = [
        (r"patch_embed\.norm", "patch_norm"),
        (r"norm", "norm"),
        (r"layers\.(?P<stage>\d+)\.downsample\.norm", "stages.{stage}.merge_norm"),
        (block + "layernorm_before", ours + "attn_norm"),
        (block + "layernorm_after", ours + "mlp_norm"),
    ]
    dense = [
        (r"layers\.(?P<stage>\d+)\.downsample\.reduction", "stages.{stage}.merge", transpose),
        (block + r"attention\.self\.query", ours + "query", transpose),
        (block + r"attention\.self\.key", ours + "key", transpose),
        (block + r"attention\.self\.value", ours + "value", transpose),
        (block + r"attention\.output\.dense", ours + "attn_out", transpose),
        (block + r"intermediate\.dense", ours + "mlp_in", transpose),
        (block + r"output\.dense", ours + "mlp_out", transpose),
    ]
    batch_norms = [(r"batch_norm", "mel_norm")]
    if config.enable_fusion:
        dense.append((r"patch_embed\.mel_conv2d", "fusion_embed", _conv_kernel))
        # the AFF block's two nn.Sequential branches, by index: conv, norm, relu, conv, norm
        fusion = r"patch_embed\.fusion_model\."
        for branch, first in (("local", 0), ("global", 1)):  # global starts with a pooling layer
            dense += [
                (fusion + rf"{branch}_att\.{first}", f"fusion.{branch}_in", _pointwise_kernel),
                (fusion + rf"{branch}_att\.{first + 3}", f"fusion.{branch}_out", _pointwise_kernel),
            ]
            batch_norms += [
                (fusion + rf"{branch}_att\.{first + 1}", f"fusion.{branch}_in_norm"),
                (fusion + rf"{branch}_att\.{first + 4}", f"fusion.{branch}_out_norm"),
            ]
    for hf, target in layer_norms:
        rules += [Rule(encoder + hf + r"\.weight", target + ".scale"), Rule(encoder + hf + r"\.bias", target + ".bias")]
    for hf, target, kernel_transform in dense:
        rules += [
            Rule(encoder + hf + r"\.weight", target + ".kernel", kernel_transform),
            Rule(encoder + hf + r"\.bias", target + ".bias"),
        ]
    for hf, target in batch_norms:
        for torch_name, our_name in BATCH_NORM_NAMES:
            rules.append(Rule(encoder + hf + rf"\.{torch_name}", f"{target}.{our_name}"))
    return rules
