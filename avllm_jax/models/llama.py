"""LLaMA / Vicuna decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Layers are stacked and scanned. The model takes token ids or input embeddings (the
multimodal model splices encoder rows into the embeddings), explicit position ids (rows of an
absent modality are left out of the count) and segment ids (0 = a row no real token sees).
A `KVCache` (models/kv_cache.py) makes decoding one token at a time cost one layer pass per token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from avllm_jax.models import attention, layers
from avllm_jax.models.conversion import Rule, config_from_hf, transpose
from avllm_jax.models.kv_cache import KVCache, write_keys, write_segment_ids


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or HF's rope_scaling dict with rope_type 'linear' or 'llama3'.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_implementation: str = "xla"
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat_policy: str = "none"
    # LoRA adapters (layers.LoRA, scale lora_alpha / lora_rank) on the projections whose names
    # ('layers.q_proj', ..., 'layers.down_proj') a regex of lora_targets full-matches; rank 0: none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> LlamaConfig:
        """From a LlamaConfig's config.json dict; `overrides` set any field, over what the
        checkpoint says."""
        num_heads = hf["num_attention_heads"]
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            rope_scaling=_hf_rope_scaling(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
        )
        if hf.get("mlp_bias") or hf.get("attention_bias"):
            raise ValueError("LLaMA checkpoints with attention_bias or mlp_bias are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (LLaMA uses silu)")
        return config_from_hf(cls, fields, overrides)


def _hf_rope_scaling(hf: dict) -> dict | None:
    # transformers 4.x writes `rope_scaling`; 5.x folds it into `rope_parameters`.
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ("linear", "llama3"):
        raise ValueError(f"rope scaling type {rope_type!r} is not supported (linear, llama3)")
    return {k: v for k, v in scaling.items() if k != "rope_theta"} | {"rope_type": rope_type}


PRESETS = {
    "vicuna_7b": LlamaConfig(),
    "vicuna_13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40),
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
    ),
}


def rope_frequencies(config: LlamaConfig) -> jax.Array:
    """Inverse frequencies [head_dim/2], with the checkpoint's rope scaling applied."""
    exponents = jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    original_context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelength > original_context / low, inv_freq / factor, inv_freq)
    blend = (original_context / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_band = (wavelength >= original_context / high) & (wavelength <= original_context / low)
    return jnp.where(in_band, blended, scaled)


def kept_positions(kept: jax.Array) -> jax.Array:
    """Position ids [B, S] of a row mask: each kept row's count of kept rows before it, so that
    dropped rows (padding, an absent modality) leave no gap. Dropped rows get their
    predecessor's position, which nothing sees."""
    return jnp.maximum(jnp.cumsum(kept, axis=1) - 1, 0)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the rotate-half layout of HF LLaMA weights. x: [B, S, H, D]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


# The projections an adapter can target, each with the number of its kernel's input axes.
ADAPTABLE_PROJECTIONS = {
    "q_proj": 1,
    "k_proj": 1,
    "v_proj": 1,
    "o_proj": 2,
    "gate_proj": 1,
    "up_proj": 1,
    "down_proj": 1,
}
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


def lora_targets(config: LlamaConfig) -> tuple[str, ...]:
    """The projections (ADAPTABLE_PROJECTIONS' names) that get adapters. A regex that matches
    none of them is an error naming it: it would silently train less than asked."""
    if config.lora_rank == 0:
        return ()
    if config.lora_rank < 0 or not config.lora_targets:
        raise ValueError(
            f"LoRA rank {config.lora_rank} with targets {config.lora_targets!r}: the rank must be "
            "positive and at least one target regex given (rank 0 turns LoRA off)"
        )
    names = {f"layers.{name}": name for name in ADAPTABLE_PROJECTIONS}
    chosen = set()
    for pattern in config.lora_targets:
        try:
            matched = {name for full, name in names.items() if re.fullmatch(pattern, full)}
        except re.error as error:
            raise ValueError(f"LoRA target '{pattern}' is not a regex: {error}") from None
        if not matched:
            raise ValueError(f"LoRA target '{pattern}' matches none of the LLM's projections: {', '.join(names)}")
        chosen |= matched
    return tuple(name for name in ADAPTABLE_PROJECTIONS if name in chosen)


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, dtype = config, layers.dtype_of(config.param_dtype)
        norm = functools.partial(
            layers.RMSNorm, c.hidden_size, eps=c.rms_norm_eps, logical_axis="embed", param_dtype=dtype, rngs=rngs
        )
        dense = functools.partial(layers.Dense, bias=False, stddev=0.02, param_dtype=dtype, rngs=rngs)
        self.input_norm = norm()
        # q/k/v/o are [embed, heads, head_dim] kernels, not Dense: 'tensor' splits whole heads.
        self.q_proj = layers.param(
            rngs, (c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "kv"), dtype=dtype
        )
        self.k_proj = layers.param(
            rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "heads", "kv"), dtype=dtype
        )
        self.v_proj = layers.param(
            rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "heads", "kv"), dtype=dtype
        )
        self.o_proj = layers.param(
            rngs, (c.num_heads, c.head_dim, c.hidden_size), ("heads", "kv", "embed"), dtype=dtype
        )
        self.post_attention_norm = norm()
        self.gate_proj = dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"))
        self.up_proj = dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"))
        self.down_proj = dense(c.intermediate_size, c.hidden_size, ("mlp", "embed"))
        # Beside the kernels, not in them: the base weights keep their names, so converted and
        # trained checkpoints load into a model with adapters.
        self.lora = nnx.Dict(
            {
                name: layers.LoRA(
                    self._kernel(name), ADAPTABLE_PROJECTIONS[name], rank=c.lora_rank, alpha=c.lora_alpha, rngs=rngs
                )
                for name in lora_targets(c)
            }
        )

    def _kernel(self, name: str) -> nnx.Param:
        projection = getattr(self, name)
        return projection.kernel if isinstance(projection, layers.Dense) else projection

    def _adapted(self, name: str, x: jax.Array, projected: jax.Array) -> jax.Array:
        """`projected` (the projection `name` of x) plus its adapter's update, where it has one."""
        return projected + self.lora[name](x) if name in self.lora else projected

    def __call__(self, x, positions, inv_freq, query_segment_ids, kv_cache=None, kv_segment_ids=None, cache_length=0):
        """x: [B, S, D]. kv_cache: this layer's (keys, values) [B, G, max_length, D] or None.

        Returns the new hidden state and, when a cache is given, the layer's (keys, values)
        with this call's rows written at `cache_length`.
        """
        c, dtype = self.config, x.dtype
        x = layers.constrain(x, layers.RESIDUAL)
        h = self.input_norm(x)
        q, k, v = (
            self._adapted(name, h, jnp.einsum("bsd,dhk->bshk", h, self._kernel(name)[...].astype(dtype)))
            for name in ("q_proj", "k_proj", "v_proj")
        )
        q, k, v = (layers.constrain(t, layers.HEADS) for t in (q, k, v))
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if kv_cache is None:
            keys, values, kv_segment_ids = k, v, query_segment_ids
        else:
            # k, v become the updated cache arrays (returned below); attention reads them through
            # a transposed view, which XLA folds into its matmuls.
            k, v = (write_keys(cached, new, cache_length) for cached, new in zip(kv_cache, (k, v)))
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        implementation = c.attention_implementation
        out = attention.dot_product_attention(
            q,
            keys.astype(dtype),
            values.astype(dtype),
            query_segment_ids=query_segment_ids,
            kv_segment_ids=kv_segment_ids,
            # Per-row fill levels take one token per row, after every filled slot of its row:
            # the segment ids alone mask what it must not see.
            causal=jnp.ndim(cache_length) == 0,
            query_offset=cache_length if jnp.ndim(cache_length) == 0 else 0,
            implementation=implementation,
        )
        out = layers.constrain(out, layers.HEADS)
        attended = self._adapted("o_proj", out, jnp.einsum("bshk,hkd->bsd", out, self.o_proj[...].astype(dtype)))
        x = layers.constrain(x + attended, layers.RESIDUAL)
        h = self.post_attention_norm(x)
        gate, up = (self._adapted(name, h, getattr(self, name)(h)) for name in ("gate_proj", "up_proj"))
        hidden = layers.constrain(jax.nn.silu(gate) * up, layers.MLP)
        x = layers.constrain(x + self._adapted("down_proj", hidden, self.down_proj(hidden)), layers.RESIDUAL)
        return x, (None if kv_cache is None else (k, v))


class Llama(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = layers.dtype_of(config.param_dtype)
        self.embed = layers.param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype=dtype)
        self.layers = layers.stacked(config.num_layers, lambda r: DecoderLayer(config, rngs=r), rngs)
        self.final_norm = layers.RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, logical_axis="embed", param_dtype=dtype, rngs=rngs
        )
        # Not a Dense: the logits are accumulated in float32, and with tied embeddings they
        # come from `embed` transposed.
        if not config.tie_word_embeddings:
            self.lm_head = layers.param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), dtype=dtype)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return self.embed[...].astype(layers.dtype_of(self.config.dtype))[input_ids]

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden_states: bool = False,
        unstacked: list[DecoderLayer] | None = None,
    ):
        """Logits [B, S, V] (float32), and the updated cache when one is given.

        positions default to 0..S-1 after the cached slots; segment_ids default to all ones.
        With `return_hidden_states`, the final-norm hidden states replace the logits, so that
        a caller applies `logits` to the rows it needs only (generation: each prompt's last).
        `unstacked`: this model's `unstack_layers()`, for one-token steps with a cache.
        """
        if input_ids is not None and inputs_embeds is None:
            x = self.embed_tokens(input_ids)
        elif inputs_embeds is not None and input_ids is None:
            x = inputs_embeds
        else:
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = layers.constrain(x.astype(layers.dtype_of(self.config.dtype)), layers.RESIDUAL)
        batch, length = x.shape[:2]
        cache_length = 0 if cache is None else cache.length
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        if cache is not None and cache.per_row and (length != 1 or positions is None):
            raise ValueError("a cache with per-row fill levels takes one token per row, with its positions")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length) + cache_length, (batch, length))
        inv_freq = rope_frequencies(self.config)

        if cache is None:
            x, _ = layers.scan_layers(
                self.layers,
                x,
                call=lambda layer, h, _: layer(h, positions, inv_freq, segment_ids),
                remat_policy=self.config.remat_policy,
            )
        else:
            kv_segment_ids = write_segment_ids(cache.segment_ids, segment_ids, cache.length)
            call = lambda layer, h, kv: layer(h, positions, inv_freq, segment_ids, kv, kv_segment_ids, cache_length)
            if length == 1:
                # Decoding: layers unrolled, so that each updates its own cache arrays in place; a
                # scan would copy every layer's cache out of a stacked array at every token.
                new_keys, new_values = [], []
                for i, layer in enumerate(unstacked or self.unstack_layers()):
                    x, (k, v) = call(layer, x, (cache.keys[i], cache.values[i]))
                    new_keys.append(k)
                    new_values.append(v)
                keys, values = tuple(new_keys), tuple(new_values)
            else:
                # A prompt: one scanned layer, so compile time does not grow with depth; stacking
                # copies the cache once per call, which is small beside the prompt's compute.
                x, (stacked_keys, stacked_values) = layers.scan_layers(
                    self.layers, x, (jnp.stack(cache.keys), jnp.stack(cache.values)), call=call
                )
                keys, values = tuple(stacked_keys), tuple(stacked_values)
            cache = KVCache(keys, values, kv_segment_ids, cache.length + length)
        x = self.final_norm(x)
        outputs = x if return_hidden_states else self.logits(x)
        return outputs if cache is None else (outputs, cache)

    def unstack_layers(self) -> list[DecoderLayer]:
        """The layers one by one. A decoding loop takes them once, before it starts: XLA on CPU
        copies a layer's weights out of the stacked arrays at every step otherwise (at batch 1
        that made a step 1.5x slower). Pass them as `__call__(..., unstacked=...)`."""
        graphdef, stacked = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda w: w[i], stacked)) for i in range(self.config.num_layers)]

    def logits(self, hidden_states: jax.Array) -> jax.Array:
        dtype = hidden_states.dtype
        if self.config.tie_word_embeddings:
            logits = jnp.einsum(
                "bsd,vd->bsv", hidden_states, self.embed[...].astype(dtype), preferred_element_type=jnp.float32
            )
        else:
            logits = jnp.einsum(
                "bsd,dv->bsv", hidden_states, self.lm_head[...].astype(dtype), preferred_element_type=jnp.float32
            )
        return layers.constrain(logits, ("batch", "length", "vocab"))


def hf_rules(config: LlamaConfig) -> list[Rule]:
    """HF LlamaForCausalLM tensor names -> ours."""
    c = config
    layer = r"model\.layers\.(?P<layer>\d+)\."
    heads = lambda n: lambda w: w.T.reshape(c.hidden_size, n, c.head_dim)
    return [
        Rule(r"model\.embed_tokens\.weight", "embed"),
        Rule(layer + r"input_layernorm\.weight", "layers.input_norm.scale"),
        Rule(layer + r"self_attn\.q_proj\.weight", "layers.q_proj", heads(c.num_heads)),
        Rule(layer + r"self_attn\.k_proj\.weight", "layers.k_proj", heads(c.num_kv_heads)),
        Rule(layer + r"self_attn\.v_proj\.weight", "layers.v_proj", heads(c.num_kv_heads)),
        Rule(
            layer + r"self_attn\.o_proj\.weight",
            "layers.o_proj",
            lambda w: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
        ),
        # Older checkpoints (Vicuna v0/v1.1) saved the rotary buffer; it is recomputed here.
        Rule(layer + r"self_attn\.rotary_emb\.inv_freq", None),
        Rule(layer + r"post_attention_layernorm\.weight", "layers.post_attention_norm.scale"),
        *(
            Rule(layer + rf"mlp\.{name}\.weight", f"layers.{name}.kernel", transpose)
            for name in ("gate_proj", "up_proj", "down_proj")
        ),
        Rule(r"model\.norm\.weight", "final_norm.scale"),
        Rule(r"lm_head\.weight", None if c.tie_word_embeddings else "lm_head", transpose),
    ]
