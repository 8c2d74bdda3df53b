"""CLIP ViT vision tower: patch embedding, class token, position embeddings, pre-layernorm,
pre-norm transformer layers (scanned) with a quick-GELU (or GELU) MLP, post-layernorm.

The model takes CLIP-normalised pixels (`normalize_frames`, the input contract of every CLIP
checkpoint) and returns the hidden states after a chosen layer, [B, 1+N, D]: row 0 is the
class token (the paper's per-frame temporal token), rows 1..N the patches (averaged over time
into the spatial tokens by the composite model).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avllm_jax.models import attention, layers
from avllm_jax.models.conversion import Rule, config_from_hf, transpose

# The pixel statistics every CLIP checkpoint was trained with (its image processor's).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Which hidden state to return, as an index into HF's `hidden_states` tuple
    # (0 = embeddings after the pre-layernorm, -1 = after the last layer; LLaVA uses -2).
    select_layer: int = -1
    # Apply the post-layernorm to every returned row (HF applies it to the pooled class token only).
    apply_post_layernorm: bool = False
    attention_implementation: str = "xla"
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: str = "none"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> CLIPVisionConfig:
        """From a CLIPVisionConfig dict, or a CLIPConfig dict (its `vision_config`); `overrides`
        set any field, over what the checkpoint says."""
        hf = hf.get("vision_config", hf)
        fields = dict(
            image_size=hf.get("image_size", 224),
            patch_size=hf.get("patch_size", 32),
            hidden_size=hf.get("hidden_size", 768),
            intermediate_size=hf.get("intermediate_size", 3072),
            num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            hidden_act=hf.get("hidden_act", "quick_gelu"),
        )
        if fields["hidden_act"] not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {fields['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}")
        return config_from_hf(cls, fields, overrides)


PRESETS = {
    "vit_b16": CLIPVisionConfig(patch_size=16, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12),
    "vit_l14": CLIPVisionConfig(),
    "vit_l14_336": CLIPVisionConfig(image_size=336),
    "vit_h14": CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=16, hidden_act="gelu"
    ),
    "tiny": CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2
    ),
}


def normalize_frames(frames):
    """uint8 RGB [..., 3] -> float32 (x / 255 - mean) / std with CLIP's statistics.

    Works on numpy and jax arrays alike (the composite model calls it on device)."""
    return (frames.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


class EncoderLayer(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, dtype = config, layers.dtype_of(config.param_dtype)
        head_dim = c.hidden_size // c.num_heads
        stddev = c.hidden_size**-0.5  # fan-in scaled, as in CLIPVision (fc1/fc2: Dense's default)
        norm = functools.partial(
            layers.LayerNorm, c.hidden_size, eps=c.layer_norm_eps, logical_axis="embed", param_dtype=dtype, rngs=rngs
        )
        self.norm1 = norm()
        # q/k/v/o are [embed, heads, head_dim] kernels, not Dense: 'tensor' splits whole heads.
        for name in ("q", "k", "v"):
            setattr(
                self,
                f"{name}_proj",
                layers.param(
                    rngs, (c.hidden_size, c.num_heads, head_dim), ("embed", "heads", "kv"), dtype=dtype, stddev=stddev
                ),
            )
            setattr(
                self,
                f"{name}_bias",
                layers.param(rngs, (c.num_heads, head_dim), ("heads", "kv"), dtype=dtype, init="zeros"),
            )
        self.o_proj = layers.param(
            rngs, (c.num_heads, head_dim, c.hidden_size), ("heads", "kv", "embed"), dtype=dtype, stddev=stddev
        )
        self.o_bias = layers.param(rngs, (c.hidden_size,), ("embed",), dtype=dtype, init="zeros")
        self.norm2 = norm()
        self.fc1 = layers.Dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"), param_dtype=dtype, rngs=rngs)
        self.fc2 = layers.Dense(c.intermediate_size, c.hidden_size, ("mlp", "embed"), param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        c, dtype = self.config, x.dtype
        cast = lambda p: p[...].astype(dtype)
        x = layers.constrain(x, layers.RESIDUAL)
        h = self.norm1(x)
        q, k, v = (
            layers.constrain(
                jnp.einsum("bsd,dhk->bshk", h, cast(getattr(self, f"{n}_proj"))) + cast(getattr(self, f"{n}_bias")),
                layers.HEADS,
            )
            for n in ("q", "k", "v")
        )
        out = layers.constrain(
            attention.dot_product_attention(q, k, v, causal=False, implementation=c.attention_implementation),
            layers.HEADS,
        )
        x = layers.constrain(
            x + jnp.einsum("bshk,hkd->bsd", out, cast(self.o_proj)) + cast(self.o_bias), layers.RESIDUAL
        )
        hidden = layers.constrain(ACTIVATIONS[c.hidden_act](self.fc1(self.norm2(x))), layers.MLP)
        return layers.constrain(x + self.fc2(hidden), layers.RESIDUAL)


class CLIPVision(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, dtype = config, layers.dtype_of(config.param_dtype)
        # Random weights are fan-in scaled (unit-variance embeddings, kernels with stddev
        # 1/sqrt(inputs), flax's defaults), not HF's 0.02: then an untrained tower's class
        # token follows the picture (what the object is and where), which a frozen random
        # encoder such as the demo's needs. With 0.02 it barely moves. Converted weights
        # replace all of this.
        patch_inputs = c.patch_size * c.patch_size * 3
        self.patch_embed = layers.param(
            rngs,
            (c.patch_size, c.patch_size, 3, c.hidden_size),
            (None, None, None, "embed"),
            dtype=dtype,
            stddev=patch_inputs**-0.5,
        )
        self.class_embed = layers.param(rngs, (c.hidden_size,), ("embed",), dtype=dtype, stddev=1.0)
        self.position_embed = layers.param(
            rngs, (c.num_patches + 1, c.hidden_size), (None, "embed"), dtype=dtype, stddev=1.0
        )
        self.pre_norm = layers.LayerNorm(
            c.hidden_size, eps=c.layer_norm_eps, logical_axis="embed", param_dtype=dtype, rngs=rngs
        )
        self.layers = layers.stacked(c.num_layers, lambda r: EncoderLayer(c, rngs=r), rngs)
        # HF applies it to the pooled class token; `apply_post_layernorm` applies it to every row.
        self.post_norm = layers.LayerNorm(
            c.hidden_size, eps=c.layer_norm_eps, logical_axis="embed", param_dtype=dtype, rngs=rngs
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: float32 [B, H, W, 3], CLIP-normalised. Returns [B, 1+N, D]."""
        c = self.config
        dtype = layers.dtype_of(c.dtype)
        batch, height, width, _ = pixels.shape
        if (height, width) != (c.image_size, c.image_size):
            raise ValueError(f"CLIP expects {c.image_size}x{c.image_size} pixels, got {height}x{width}")
        p, grid = c.patch_size, c.image_size // c.patch_size
        # Non-overlapping patches as one matmul: [B, grid, p, grid, p, 3] -> [B, N, p*p*3].
        patches = pixels.astype(dtype).reshape(batch, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid * grid, p * p * 3)
        x = patches @ self.patch_embed[...].astype(dtype).reshape(p * p * 3, c.hidden_size)
        class_token = jnp.broadcast_to(self.class_embed[...].astype(dtype), (batch, 1, c.hidden_size))
        x = jnp.concatenate([class_token, x], axis=1) + self.position_embed[...].astype(dtype)
        x = self.pre_norm(layers.constrain(x, layers.RESIDUAL))
        num_layers = c.select_layer % (c.num_layers + 1)
        if num_layers:
            x, _ = layers.scan_layers(
                self.layers,
                x,
                call=lambda layer, h, _: (layer(h), None),
                remat_policy=c.remat_policy,
                num_layers=num_layers,
            )
        return self.post_norm(x) if c.apply_post_layernorm else x


def hf_rules(config: CLIPVisionConfig) -> list[Rule]:
    """HF CLIPVisionModel (or CLIPModel, whose text tower is dropped) tensor names -> ours."""
    c = config
    head_dim = c.hidden_size // c.num_heads
    # transformers 5 saves a bare CLIPVisionModel without the `vision_model.` prefix.
    tower = r"(?:vision_model\.)?"
    layer = tower + r"encoder\.layers\.(?P<layer>\d+)\."
    heads = lambda w: w.T.reshape(c.hidden_size, c.num_heads, head_dim)
    head_bias = lambda b: b.reshape(c.num_heads, head_dim)
    rules = [
        Rule(tower + r"embeddings\.class_embedding", "class_embed"),
        # torch conv [D, 3, p, p] -> [p, p, 3, D], the order of our flattened NHWC patches.
        Rule(tower + r"embeddings\.patch_embedding\.weight", "patch_embed", lambda w: w.transpose(2, 3, 1, 0)),
        Rule(tower + r"embeddings\.position_embedding\.weight", "position_embed"),
        Rule(tower + r"embeddings\.position_ids", None),
        Rule(tower + r"pre_layrnorm\.weight", "pre_norm.scale"),
        Rule(tower + r"pre_layrnorm\.bias", "pre_norm.bias"),
        Rule(tower + r"post_layernorm\.weight", "post_norm.scale"),
        Rule(tower + r"post_layernorm\.bias", "post_norm.bias"),
        Rule(
            layer + r"self_attn\.out_proj\.weight",
            "layers.o_proj",
            lambda w: w.T.reshape(c.num_heads, head_dim, c.hidden_size),
        ),
        Rule(layer + r"self_attn\.out_proj\.bias", "layers.o_bias"),
        # A full CLIPModel checkpoint also holds the text tower and the contrastive heads.
        Rule(r"(text_model|text_projection|visual_projection|logit_scale).*", None),
    ]
    for name in ("q", "k", "v"):
        rules.append(Rule(layer + rf"self_attn\.{name}_proj\.weight", f"layers.{name}_proj", heads))
        rules.append(Rule(layer + rf"self_attn\.{name}_proj\.bias", f"layers.{name}_bias", head_bias))
    for i in (1, 2):
        rules.append(Rule(layer + rf"layer_norm{i}\.weight", f"layers.norm{i}.scale"))
        rules.append(Rule(layer + rf"layer_norm{i}\.bias", f"layers.norm{i}.bias"))
        rules.append(Rule(layer + rf"mlp\.fc{i}\.weight", f"layers.fc{i}.kernel", transpose))
        rules.append(Rule(layer + rf"mlp\.fc{i}\.bias", f"layers.fc{i}.bias"))
    return rules
