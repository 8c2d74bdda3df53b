"""HTSAT, the audio encoder of CLAP (laion/clap-htsat-unfused and -fused), in Flax NNX.

Input: CLAP log-mel features [B, C, frames, 64] (`data/features.py`; C = 4 for the fused
model, 1 otherwise). The model normalises each mel bin (a frozen BatchNorm), stretches the
frames to `spec_size * freq_ratio` (bicubic), folds the spectrogram into a square image (time
cut into `freq_ratio` pieces stacked along the frequency axis), embeds 4x4 patches and runs a
Swin Transformer (`models/swin.py`: window attention, shifted windows, patch merging; the
stages differ in width, so they are a Python loop, of 4 in CLAP). Output: the mean over the last stage's
positions, the 768-d embedding CLAP projects (and the paper's E_a row), and on request the
last hidden state. The fused model adds attentional feature fusion (AFF): the three
window-long crops are embedded with a wider kernel and mixed into the patches of the shrunk
whole clip, for the segments flagged `is_longer`; it is computed for every segment and
selected per segment, so that shapes stay static.

Weights: `hf_rules` maps a `ClapAudioModel` or `ClapModel` checkpoint (text tower and
projections dropped on purpose); `HTSATConfig.from_hf` reads its config.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avllm_jax.models.conversion import Rule, config_from_hf, transpose
from avllm_jax.models.layers import Dense, LayerNorm, constrain, dtype_of, param
from avllm_jax.models.swin import MAP, Stage

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which CLAP keeps


@dataclasses.dataclass(frozen=True)
class HTSATConfig:
    kind: typing.ClassVar[str] = "htsat"  # which audio encoder (AVLLMConfig.audio) this configures
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
    def max_frames(self) -> int:
        """The most spectrogram frames its square image takes (fewer are stretched to fit)."""
        return self.spec_size * self.freq_ratio

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
        """From the dict of a ClapConfig (its 'audio_config') or of a bare ClapAudioConfig;
        `overrides` set any field, over what the checkpoint says."""
        config = config.get("audio_config", config)
        if config.get("enable_fusion") and config.get("fusion_type") == "channel_map":
            raise ValueError("HTSAT fusion_type 'channel_map' is not supported (CLAP checkpoints use 'aff_2d')")
        only_supported = {"patch_embed_input_channels": 1, "flatten_patch_embeds": True, "hidden_act": "gelu"}
        for key, supported in only_supported.items():
            if config.get(key, supported) != supported:
                raise ValueError(f"HTSAT config {key}={config[key]!r} is not supported (only {supported!r})")
        pair = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v, v)
        defaults = cls()
        fields = dict(
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
        )
        return config_from_hf(cls, fields, overrides)


PRESETS = {
    "clap_htsat_unfused": HTSATConfig(),
    "clap_htsat_fused": HTSATConfig(enable_fusion=True),
}


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
        dense = functools.partial(Dense, param_dtype=dtype_of(config.param_dtype), rngs=rngs)  # 1x1 convolutions
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


class HTSAT(nnx.Module):
    def __init__(self, config: HTSATConfig, *, rngs: nnx.Rngs):
        self.config = config
        width = config.embed_dim
        self.mel_norm = BatchNorm(config.num_mel_bins, config=config, rngs=rngs)
        self.patch_embed = Conv(1, width, config.patch_size, config.patch_stride, config=config, rngs=rngs)
        if config.enable_fusion:
            # the crops are embedded with a kernel 3x wider in time, then laid side by side
            wide = lambda size: (size[0], 3 * size[1])
            self.fusion_embed: Conv | None = Conv(
                1, width, wide(config.patch_size), wide(config.patch_stride), config=config, rngs=rngs
            )
            self.fusion: FeatureFusion | None = FeatureFusion(config, rngs=rngs)
        else:
            self.fusion_embed = self.fusion = None
        dtype = dtype_of(config.param_dtype)
        norm = functools.partial(LayerNorm, eps=config.layer_norm_eps, param_dtype=dtype, rngs=rngs)
        self.patch_norm = norm(width) if config.patch_layer_norm else None
        self.stages = nnx.List(
            [
                Stage(
                    width * 2**i,
                    config.resolutions[i],
                    config.depths[i],
                    config.num_heads[i],
                    window_size=config.window_size,
                    merge=i + 1 < len(config.depths),
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    eps=config.layer_norm_eps,
                    param_dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(config.depths))
            ]
        )
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
        image = constrain(self._spectrogram_image(self.mel_norm(features.astype(dtype_of(config.dtype)))), MAP)
        x = constrain(self.patch_embed(image[..., :1]), MAP)
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
        target_frames, target_bins = config.max_frames, config.spec_size // ratio
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
def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bicubic resize (a = -0.75, align_corners=True, clamped
    edges). Source positions in float32 like torch's, which keeps the weights within 1e-7."""
    a = -0.75
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0.0)
    source = scale * np.arange(out_size, dtype=np.float32)
    base = np.floor(source).astype(int)
    t = (source - base).astype(np.float64)
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
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
