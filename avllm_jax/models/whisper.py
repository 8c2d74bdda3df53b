"""The Whisper encoder (openai/whisper-tiny ... large-v3), an alternative audio tower, in Flax NNX.

Input: Whisper log-mel features [B, num_mel_bins, 3000] of one 30 s window at 16 kHz
(`data/features.py`, `whisper_audio_features`). Two 1-D convolutions (k=3; the second with
stride 2) with GELU turn the 3000 mel frames into 1500 frames of 20 ms, the checkpoint's
position table is added, then pre-norm transformer layers (scanned) and a final LayerNorm.
`__call__` returns HF's `last_hidden_state`, [B, 1500, D].

K audio tokens from one clip (`audio_embeddings`, `segment_embeddings`): the encoder runs
once over the clip's 30 s window, and each of the K tokens is the mean of the encoder frames
in one of K equal time spans of the real audio, `valid_frames` frames, not of the padding
that fills the window. Encoding each segment on its own, as the HTSAT path does, would cost
K full 30 s passes (Whisper takes nothing shorter), almost all of it padding, and each
segment would lose the context of the rest of the clip. Clips longer than 30 s are cut to
their first 30 s by the front end (as Whisper's own feature extractor does), so the K spans
then cover those 30 s.

Weights: `hf_rules` maps a `WhisperModel` (`encoder.`) or `WhisperForConditionalGeneration`
(`model.encoder.`) checkpoint; the decoder is dropped on purpose. `WhisperEncoderConfig.from_hf`
reads its config.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avllm_jax.models import attention, layers
from avllm_jax.models.conversion import Rule, config_from_hf, transpose

CONV_STRIDE = 2  # of the second convolution: two mel frames (10 ms each) per encoder frame


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # torch's default GELU, which Whisper uses


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    kind: typing.ClassVar[str] = "whisper"  # which audio encoder (AVLLMConfig.audio) this configures
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # encoder frames of one 30 s window
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which Whisper keeps
    attention_implementation: str = "xla"
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of {self.encoder_attention_heads} heads")
        if self.d_model % 2 or self.d_model < 4:
            raise ValueError(f"d_model {self.d_model} must be even and at least 4 (sinusoidal positions)")

    @property
    def num_features(self) -> int:
        """Width of an audio embedding (what the audio projector takes), as HTSATConfig has."""
        return self.d_model

    @property
    def num_frames(self) -> int:
        """Mel frames of the input window (3000 for 30 s)."""
        return self.max_source_positions * CONV_STRIDE

    @classmethod
    def from_hf(cls, config: dict, **overrides) -> WhisperEncoderConfig:
        """From the dict of a WhisperConfig; `overrides` set any field, over what the checkpoint says."""
        activation = config.get("activation_function", "gelu")
        if activation != "gelu":
            raise ValueError(f"Whisper activation_function {activation!r} is not supported (only 'gelu')")
        defaults = cls()
        names = (
            "num_mel_bins",
            "d_model",
            "encoder_layers",
            "encoder_attention_heads",
            "encoder_ffn_dim",
            "max_source_positions",
        )
        fields = {name: config.get(name, getattr(defaults, name)) for name in names}
        return config_from_hf(cls, fields, overrides)


def _preset(d_model, num_layers, heads, num_mel_bins=80):
    return WhisperEncoderConfig(
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=num_layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
    )


PRESETS = {
    "whisper_tiny": _preset(384, 4, 6),
    "whisper_base": _preset(512, 6, 8),
    "whisper_small": _preset(768, 12, 12),
    "whisper_medium": _preset(1024, 24, 16),
    "whisper_large": _preset(1280, 32, 20),  # large and large-v2
    "whisper_large_v3": _preset(1280, 32, 20, num_mel_bins=128),
    "tiny": _preset(32, 2, 2),  # for tests and the CPU demo
}


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """[length, channels] Whisper's position table: sines then cosines of geometric timescales.

    Computed in float64: HF's float32 angles (up to 1500 rad) are off by up to 1e-4, so its
    table differs from this one by that much. Converted weights bring the checkpoint's table."""
    log_increment = np.log(max_timescale) / (channels // 2 - 1)
    inverse_timescales = np.exp(-log_increment * np.arange(channels // 2))
    scaled_time = np.arange(length)[:, None] * inverse_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


class Conv1d(nnx.Module):
    """A 1-D convolution over [B, T, C_in] (kernel 3, padding 1) with a [3, in, out] kernel."""

    def __init__(self, channels_in: int, channels_out: int, *, stride: int, param_dtype, rngs: nnx.Rngs):
        self.kernel = layers.param(
            rngs,
            (3, channels_in, channels_out),
            (None, None, "embed"),
            dtype=param_dtype,
            stddev=(3 * channels_in) ** -0.5,
        )
        self.bias = layers.param(rngs, (channels_out,), ("embed",), dtype=param_dtype, init="zeros")
        self.stride = stride

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), (self.stride,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC")
        )
        return y + self.bias[...].astype(x.dtype)


class EncoderLayer(nnx.Module):
    def __init__(self, config: WhisperEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, dtype = config, layers.dtype_of(config.param_dtype)
        heads, head_dim = c.encoder_attention_heads, c.d_model // c.encoder_attention_heads
        stddev = c.d_model**-0.5
        norm = functools.partial(
            layers.LayerNorm, c.d_model, eps=c.layer_norm_eps, logical_axis="embed", param_dtype=dtype, rngs=rngs
        )
        self.attn_norm = norm()
        # q/k/v/o are [embed, heads, head_dim] kernels, not Dense: 'tensor' splits whole heads.
        for name in ("q", "k", "v"):
            setattr(
                self,
                f"{name}_proj",
                layers.param(rngs, (c.d_model, heads, head_dim), ("embed", "heads", "kv"), dtype=dtype, stddev=stddev),
            )
        # Whisper's key projection has no bias (a bias on k would not change the softmax).
        self.q_bias = layers.param(rngs, (heads, head_dim), ("heads", "kv"), dtype=dtype, init="zeros")
        self.v_bias = layers.param(rngs, (heads, head_dim), ("heads", "kv"), dtype=dtype, init="zeros")
        self.o_proj = layers.param(
            rngs, (heads, head_dim, c.d_model), ("heads", "kv", "embed"), dtype=dtype, stddev=stddev
        )
        self.o_bias = layers.param(rngs, (c.d_model,), ("embed",), dtype=dtype, init="zeros")
        self.mlp_norm = norm()
        self.fc1 = layers.Dense(c.d_model, c.encoder_ffn_dim, ("embed", "mlp"), param_dtype=dtype, rngs=rngs)
        self.fc2 = layers.Dense(c.encoder_ffn_dim, c.d_model, ("mlp", "embed"), param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        cast = lambda p: p[...].astype(dtype)
        x = layers.constrain(x, layers.RESIDUAL)
        h = self.attn_norm(x)
        project = lambda name: jnp.einsum("bsd,dhk->bshk", h, cast(getattr(self, f"{name}_proj")))
        q = layers.constrain(project("q") + cast(self.q_bias), layers.HEADS)
        k = layers.constrain(project("k"), layers.HEADS)
        v = layers.constrain(project("v") + cast(self.v_bias), layers.HEADS)
        out = attention.dot_product_attention(
            q, k, v, causal=False, implementation=self.config.attention_implementation
        )
        out = layers.constrain(out, layers.HEADS)
        x = layers.constrain(
            x + jnp.einsum("bshk,hkd->bsd", out, cast(self.o_proj)) + cast(self.o_bias), layers.RESIDUAL
        )
        hidden = layers.constrain(gelu(self.fc1(self.mlp_norm(x))), layers.MLP)
        return layers.constrain(x + self.fc2(hidden), layers.RESIDUAL)


class WhisperEncoder(nnx.Module):
    def __init__(self, config: WhisperEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, dtype = config, layers.dtype_of(config.param_dtype)
        self.conv1 = Conv1d(c.num_mel_bins, c.d_model, stride=1, param_dtype=dtype, rngs=rngs)
        self.conv2 = Conv1d(c.d_model, c.d_model, stride=CONV_STRIDE, param_dtype=dtype, rngs=rngs)
        # A parameter, not a constant: converted weights bring the checkpoint's own table
        # (HF stores it), and a randomly initialised encoder starts from Whisper's sinusoids.
        table = jnp.asarray(sinusoids(c.max_source_positions, c.d_model), dtype)
        self.position_embed = nnx.Param(table, logical_axes=(None, "embed"))
        self.layers = layers.stacked(c.encoder_layers, lambda r: EncoderLayer(c, rngs=r), rngs)
        self.norm = layers.LayerNorm(
            c.d_model, eps=c.layer_norm_eps, logical_axis="embed", param_dtype=dtype, rngs=rngs
        )

    def __call__(self, features: jax.Array) -> jax.Array:
        """features [B, num_mel_bins, 3000] (HF's `input_features` layout) -> [B, 1500, D]."""
        c = self.config
        if features.ndim != 3 or features.shape[1:] != (c.num_mel_bins, c.num_frames):
            raise ValueError(
                f"Whisper takes features [B, {c.num_mel_bins}, {c.num_frames}] (one 30 s window), got {features.shape}"
            )
        x = features.astype(layers.dtype_of(c.dtype)).transpose(0, 2, 1)  # channels last
        x = gelu(self.conv2(gelu(self.conv1(x))))
        x = layers.constrain(x + self.position_embed[...].astype(x.dtype), layers.RESIDUAL)
        x, _ = layers.scan_layers(self.layers, x, call=lambda layer, h, _: (layer(h), None))
        return self.norm(x)

    def audio_embeddings(self, features: jax.Array, valid_frames: jax.Array, num_segments: int) -> jax.Array:
        """features [B, num_mel_bins, 3000], valid_frames int [B] (from whisper_audio_features)
        -> [B, K, D]: the encoder frames of the real audio, mean-pooled over K equal spans."""
        return segment_embeddings(self(features), num_segments, valid_frames)


def segment_embeddings(encoder_hidden: jax.Array, num_segments: int, valid_frames: jax.Array) -> jax.Array:
    """encoder_hidden [B, F, D], valid_frames int [B] -> [B, K, D].

    Segment k is the mean of frames [floor(k V / K), floor((k+1) V / K)), V = valid_frames
    clipped to [1, F]: K equal spans of the real audio, the padding left out. When V < K a
    span would be empty; it then takes the one frame where it starts (spans overlap), so
    every segment is an average of real frames. Pooled in float32.
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be at least 1, got {num_segments}")
    frames = encoder_hidden.shape[1]
    valid = jnp.clip(jnp.asarray(valid_frames, jnp.int32), 1, frames)[:, None]  # [B, 1]
    segment = jnp.arange(num_segments)[None, :]
    start = segment * valid // num_segments  # [B, K]
    end = jnp.maximum((segment + 1) * valid // num_segments, start + 1)
    frame = jnp.arange(frames)
    in_span = (frame >= start[..., None]) & (frame < end[..., None])  # [B, K, F]
    weights = in_span / jnp.sum(in_span, axis=-1, keepdims=True, dtype=jnp.float32)
    pooled = jnp.einsum("bkf,bfd->bkd", weights, encoder_hidden.astype(jnp.float32))
    return pooled.astype(encoder_hidden.dtype)


def _conv_kernel(x: np.ndarray) -> np.ndarray:
    """torch Conv1d [out, in, k] -> [k, in, out]."""
    return x.transpose(2, 1, 0)


def hf_rules(config: WhisperEncoderConfig) -> list[Rule]:
    """Rules from the names of a WhisperModel / WhisperForConditionalGeneration checkpoint to ours."""
    c = config
    heads, head_dim = c.encoder_attention_heads, c.d_model // c.encoder_attention_heads
    encoder = r"(?:model\.)?encoder\."
    layer = encoder + r"layers\.(?P<layer>\d+)\."
    to_heads = lambda w: w.T.reshape(c.d_model, heads, head_dim)
    head_bias = lambda b: b.reshape(heads, head_dim)
    rules = [
        # the decoder, and the output projection of WhisperForConditionalGeneration (tied to it)
        Rule(r"(?:model\.)?decoder\..*|proj_out\.weight", None),
        Rule(encoder + r"embed_positions\.weight", "position_embed"),
        Rule(
            layer + r"self_attn\.out_proj\.weight", "layers.o_proj", lambda w: w.T.reshape(heads, head_dim, c.d_model)
        ),
        Rule(layer + r"self_attn\.out_proj\.bias", "layers.o_bias"),
        Rule(layer + r"self_attn\.q_proj\.bias", "layers.q_bias", head_bias),
        Rule(layer + r"self_attn\.v_proj\.bias", "layers.v_bias", head_bias),
    ]
    for name in ("q", "k", "v"):
        rules.append(Rule(layer + rf"self_attn\.{name}_proj\.weight", f"layers.{name}_proj", to_heads))
    for conv in ("conv1", "conv2"):
        rules += [
            Rule(encoder + rf"{conv}\.weight", f"{conv}.kernel", _conv_kernel),
            Rule(encoder + rf"{conv}\.bias", f"{conv}.bias"),
        ]
    norms = [
        (encoder + "layer_norm", "norm"),
        (layer + "self_attn_layer_norm", "layers.attn_norm"),
        (layer + "final_layer_norm", "layers.mlp_norm"),
    ]
    for hf, ours in norms:
        rules += [Rule(hf + r"\.weight", ours + ".scale"), Rule(hf + r"\.bias", ours + ".bias")]
    for fc in ("fc1", "fc2"):
        rules += [
            Rule(layer + rf"{fc}\.weight", f"layers.{fc}.kernel", transpose),
            Rule(layer + rf"{fc}\.bias", f"layers.{fc}.bias"),
        ]
    return rules
