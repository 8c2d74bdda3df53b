"""The audio-visual LLM: frozen encoders, linear projectors, and the LLaMA decoder.

A sample's modality rows are, in order, T temporal tokens (each frame's CLS token through
W_t), N spatial tokens (the patch tokens averaged over time through W_s) and K audio tokens
(each segment's pooled HTSAT embedding through W_a). They replace the modality token of the
prompt. Every sample has slots for all T+N+K rows; the rows of an absent modality are dropped
from attention (segment id 0) and from the position count, and are zeroed with a `where`, so
a sample in a mixed batch computes what it computes alone and sends no gradient to the
projector of a modality it lacks.
"""
from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
from flax import nnx

from avllm_jax.modality import IGNORE_INDEX
from avllm_jax.models import clip_vision, htsat, layers, llama


@dataclasses.dataclass(frozen=True)
class AVLLMConfig:
    """Any part may be None: a converted checkpoint may hold only some of them."""

    vision: clip_vision.CLIPVisionConfig | None = None
    audio: htsat.HTSATConfig | None = None
    llm: llama.LlamaConfig | None = None
    # Ids of <VIS>, <AUD>, <AUD_VIS> in the tokenizer (set by conversion).
    modality_token_ids: tuple[int, int, int] = (-1, -1, -1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AVLLMConfig":
        parts = {
            "vision": clip_vision.CLIPVisionConfig,
            "audio": htsat.HTSATConfig,
            "llm": llama.LlamaConfig,
        }
        fields = {name: None if d.get(name) is None else _dataclass_from_dict(kind, d[name]) for name, kind in parts.items()}
        return cls(**fields, modality_token_ids=tuple(d.get("modality_token_ids", (-1, -1, -1))))

    def replace(self, **overrides) -> "AVLLMConfig":
        """`replace(llm={'dtype': 'bfloat16'}, vision={...})`: updates fields of the parts."""
        parts = {name: dataclasses.replace(getattr(self, name), **fields) for name, fields in overrides.items() if getattr(self, name)}
        return dataclasses.replace(self, **parts)


def _dataclass_from_dict(cls, d: dict):
    """JSON turns tuples into lists; give tuple-typed fields their tuples back."""
    hints = typing.get_type_hints(cls)
    unknown = set(d) - set(hints)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v for k, v in d.items()})


def make_projectors(config: AVLLMConfig, *, rngs: nnx.Rngs) -> dict[str, layers.Dense]:
    """W_t and W_s when there are a vision encoder and an LLM, W_a when an audio encoder and an LLM:
    linear with bias, from an encoder's width to the LLM's (float32 parameters)."""
    projector = lambda in_features: layers.Dense(in_features, config.llm.hidden_size, (None, "embed"), rngs=rngs)  # noqa: E731
    projectors = {}
    if config.llm and config.vision:
        projectors["temporal_proj"] = projector(config.vision.hidden_size)
        projectors["spatial_proj"] = projector(config.vision.hidden_size)
    if config.llm and config.audio:
        projectors["audio_proj"] = projector(config.audio.num_features)
    return projectors


class AVLLM(nnx.Module):
    def __init__(self, config: AVLLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision = clip_vision.CLIPVision(config.vision, rngs=rngs) if config.vision else None
        self.audio = htsat.HTSAT(config.audio, rngs=rngs) if config.audio else None
        self.llm = llama.Llama(config.llm, rngs=rngs) if config.llm else None
        for name, projector in make_projectors(config, rngs=rngs).items():
            setattr(self, name, projector)

    # -- modality rows ------------------------------------------------------------------

    def visual_tokens(self, frames: jax.Array) -> jax.Array:
        """frames uint8 [B, T, S, S, 3] -> [B, T+N, D_llm] (temporal, then spatial)."""
        batch, num_frames = frames.shape[:2]
        pixels = clip_vision.normalize_frames(frames.reshape(batch * num_frames, *frames.shape[2:]))
        pixels = layers.constrain(pixels, ("batch", None, None, None))  # the frames of a device's own samples
        # No stop_gradient: when the encoder is frozen it is not among the differentiated
        # parameters, so no backward pass is built for it; when a config trains it, it trains.
        hidden = self.vision(pixels)  # [B*T, 1+N, Dv]
        hidden = hidden.reshape(batch, num_frames, *hidden.shape[1:])
        dtype = layers.dtype_of(self.config.llm.dtype)
        temporal = self.temporal_proj(hidden[:, :, 0].astype(dtype))
        spatial = self.spatial_proj(hidden[:, :, 1:].mean(axis=1).astype(dtype))
        return jnp.concatenate([temporal, spatial], axis=1)

    def audio_tokens(self, audio_features: jax.Array, audio_is_longer: jax.Array) -> jax.Array:
        """audio_features [B, K, C, F, 64] -> [B, K, D_llm]."""
        batch, num_segments = audio_features.shape[:2]
        features = layers.constrain(audio_features.reshape(batch * num_segments, *audio_features.shape[2:]), ("batch", None, None, None))
        pooled = self.audio(features, audio_is_longer.reshape(-1))
        pooled = pooled.reshape(batch, num_segments, -1)
        return self.audio_proj(pooled.astype(layers.dtype_of(self.config.llm.dtype)))

    # -- the multimodal sequence --------------------------------------------------------

    def embed_inputs(self, batch: dict) -> dict:
        """Splices the modality rows into the text embeddings.

        Returns `inputs_embeds` [B, L', D], `positions`, `segment_ids` [B, L'] and
        `targets` [B, L'] (the next text token each row must predict, IGNORE_INDEX elsewhere),
        with L' = L - 1 + T + N + K.
        """
        input_ids, token_mask = batch["input_ids"], batch["token_mask"]
        text = self.llm.embed_tokens(input_ids)
        batch_size, length, width = text.shape
        rows, row_kept = [], []
        if self.vision is not None and "frames" in batch:
            visual = self.visual_tokens(batch["frames"])
            rows.append(visual)
            row_kept.append(jnp.broadcast_to(batch["has_visual"][:, None], visual.shape[:2]))
        if self.audio is not None and "audio_features" in batch:
            audio = self.audio_tokens(batch["audio_features"], batch["audio_is_longer"])
            rows.append(audio)
            row_kept.append(jnp.broadcast_to(batch["has_audio"][:, None], audio.shape[:2]))
        if not rows:
            raise ValueError("the batch has neither frames nor audio_features for the model's encoders")
        modality = jnp.concatenate(rows, axis=1).astype(text.dtype)
        modality_kept = jnp.concatenate(row_kept, axis=1)
        num_rows = modality.shape[1]

        # Where the modality token sits; text-only samples put the (all dropped) rows at the end.
        is_modality_token = jnp.isin(input_ids, jnp.asarray(self.config.modality_token_ids))
        has_token = is_modality_token.any(axis=1)
        token_position = jnp.where(has_token, jnp.argmax(is_modality_token, axis=1), length)[:, None]
        modality_kept &= has_token[:, None]

        out_length = length - 1 + num_rows
        slot = jnp.arange(out_length)[None, :]
        in_modality = (slot >= token_position) & (slot < token_position + num_rows)
        # The modality token itself is replaced: text after it shifts by num_rows - 1.
        text_index = jnp.where(slot < token_position, slot, slot - num_rows + 1)
        text_index = jnp.clip(text_index, 0, length - 1)
        modality_index = jnp.clip(slot - token_position, 0, num_rows - 1)

        take = lambda x, index: jnp.take_along_axis(x, index, axis=1)  # noqa: E731
        text_rows = take(text, text_index[..., None])
        modality_rows = take(modality, modality_index[..., None])
        row_is_kept_modality = in_modality & take(modality_kept, modality_index)
        kept = jnp.where(in_modality, row_is_kept_modality, take(token_mask, text_index))
        # `where`, not a product: an absent modality's projector gets an exactly-zero gradient.
        inputs_embeds = jnp.where(
            row_is_kept_modality[..., None], modality_rows, jnp.where(in_modality[..., None], 0, text_rows)
        )
        inputs_embeds = layers.constrain(inputs_embeds, layers.RESIDUAL)
        positions = llama.kept_positions(kept)
        out = {"inputs_embeds": inputs_embeds, "positions": positions, "segment_ids": kept.astype(jnp.int32)}
        if "labels" in batch:
            # Each text row predicts the next text token; shifting before the splice keeps the
            # target independent of which modality rows are dropped.
            next_labels = jnp.concatenate([batch["labels"][:, 1:], jnp.full((batch_size, 1), IGNORE_INDEX)], axis=1)
            out["targets"] = jnp.where(in_modality | ~kept, IGNORE_INDEX, take(next_labels, text_index))
        return out

    def __call__(self, batch: dict, *, return_hidden_states: bool = False) -> tuple[jax.Array, dict]:
        """Logits [B, L', V] (or final hidden states) and the spliced inputs (targets included)."""
        inputs = self.embed_inputs(batch)
        outputs = self.llm(
            inputs_embeds=inputs["inputs_embeds"],
            positions=inputs["positions"],
            segment_ids=inputs["segment_ids"],
            return_hidden_states=return_hidden_states,
        )
        return outputs, inputs
