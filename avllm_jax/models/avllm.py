"""The audio-visual LLM: frozen encoders, linear projectors, and the LLaMA decoder.

A sample's modality rows are, in order, T temporal tokens (each frame's CLS token through
W_t), N spatial tokens (the patch tokens averaged over time through W_s) and K audio tokens
(each segment's embedding from the audio encoder, HTSAT or Whisper, through W_a). They replace the modality token of the
prompt. A batch is made of packs (data/packing.py): the encoders run on a pack's media slots,
their rows form the pack's modality table, and each LLM position reads either its text
embedding or one table row. A sample reads only its own rows and attends only within its
segment, so a sample in a packed, mixed batch computes what it computes alone and sends no
gradient to the projector of a modality it lacks (a row nothing reads gets none). An
unpacked batch, as inference builds it, is laid out as packs of one sample (`as_packs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from avllm_jax.modality import IGNORE_INDEX, Modality
from avllm_jax.models import clip_vision, htsat, layers, llama, whisper

# The audio encoders, by their config's `kind`: CLAP's HTSAT (the paper's) and Whisper's encoder
# (the paper's Table 6). A model's part 'audio' is one of them. (Any: each module takes its own
# kind's config, which the types cannot say.)
AUDIO_ENCODERS: dict[str, tuple[type, typing.Any]] = {
    config.kind: (config, module)
    for config, module in ((htsat.HTSATConfig, htsat.HTSAT), (whisper.WhisperEncoderConfig, whisper.WhisperEncoder))
}
AudioConfig = htsat.HTSATConfig | whisper.WhisperEncoderConfig
PARTS = ("vision", "audio", "llm")  # the parts a model may have
ENCODERS = ("vision", "audio")
# The part name a Whisper encoder had in config.json and the parameters of checkpoints written
# before it was the part 'audio'; they load as the audio part.
LEGACY_WHISPER_PART = "whisper"
# What the projectors read of a pack, as the encoders compute it or a feature cache stores it:
# each frame's CLS token [P, F, Dv], each visual item's patch tokens averaged over its frames
# [P, V, N, Dv], each audio clip's K segment embeddings [P, A, K, Da].
ENCODER_OUTPUTS = ("frame_cls", "item_patches", "audio_embeddings")


def part_config_class(part: str, audio_kind: str) -> type:
    """The dataclass configuring `part`: for the audio part, that of the encoder `audio_kind`."""
    if part == "audio":
        if audio_kind not in AUDIO_ENCODERS:
            raise ValueError(f"unknown audio encoder kind {audio_kind!r}: one of {', '.join(AUDIO_ENCODERS)}")
        return AUDIO_ENCODERS[audio_kind][0]
    return {"vision": clip_vision.CLIPVisionConfig, "llm": llama.LlamaConfig}[part]


@dataclasses.dataclass(frozen=True)
class AVLLMConfig:
    """Any part may be None: a converted checkpoint may hold only some of them."""

    vision: clip_vision.CLIPVisionConfig | None = None
    audio: AudioConfig | None = None  # its `kind` says which encoder: 'htsat' or 'whisper'
    llm: llama.LlamaConfig | None = None
    # Ids of <VIS>, <AUD>, <AUD_VIS> in the tokenizer (set by conversion).
    modality_token_ids: tuple[int, int, int] = (-1, -1, -1)

    def encoder_configs(self) -> dict[str, dict]:
        """Each encoder's config as a dict, by part name. Without the audio encoder's kind: its
        fields and the data's audio front end (which must suit it) tell the kinds apart, and a
        feature cache of an HTSAT model keeps the fingerprint it had before there were two."""
        return {part: dataclasses.asdict(getattr(self, part)) for part in ENCODERS if getattr(self, part)}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.audio is not None:
            d["audio"] = {"kind": self.audio.kind, **d["audio"]}  # whose fields these are
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AVLLMConfig:
        """`to_dict`'s dict; an audio block without a kind is an HTSAT's (as written before there
        were two), and a 'whisper' block (LEGACY_WHISPER_PART) is the audio part."""
        if d.get(LEGACY_WHISPER_PART) is not None:
            d = d | {"audio": {"kind": "whisper", **d[LEGACY_WHISPER_PART]}}
        audio = dict(d.get("audio") or {})
        audio_kind = audio.pop("kind", "htsat")
        blocks = {"vision": d.get("vision"), "audio": audio or None, "llm": d.get("llm")}
        fields = {
            part: None if block is None else _dataclass_from_dict(part_config_class(part, audio_kind), block)
            for part, block in blocks.items()
        }
        return cls(**fields, modality_token_ids=tuple(d.get("modality_token_ids", (-1, -1, -1))))

    def replace(self, **overrides) -> AVLLMConfig:
        """`replace(llm={'dtype': 'bfloat16'}, vision={...})`: updates fields of the parts."""
        parts = {
            name: dataclasses.replace(getattr(self, name), **fields)
            for name, fields in overrides.items()
            if getattr(self, name)
        }
        return dataclasses.replace(self, **parts)


def _dataclass_from_dict(cls, d: dict):
    """JSON turns tuples into lists; give tuple-typed fields their tuples back."""
    hints = typing.get_type_hints(cls)
    unknown = set(d) - set(hints)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v for k, v in d.items()})


def make_projectors(config: AVLLMConfig, *, rngs: nnx.Rngs) -> dict[str, layers.Dense]:
    """W_t and W_s when there are a vision encoder and an LLM, W_a when an audio encoder (HTSAT or
    Whisper) and an LLM: linear with bias, from an encoder's width to the LLM's (float32 parameters)."""
    if not config.llm:
        return {}
    llm_width = config.llm.hidden_size
    projector = lambda in_features: layers.Dense(in_features, llm_width, (None, "embed"), rngs=rngs)
    projectors = {}
    if config.vision:
        projectors["temporal_proj"] = projector(config.vision.hidden_size)
        projectors["spatial_proj"] = projector(config.vision.hidden_size)
    if config.audio:
        projectors["audio_proj"] = projector(config.audio.num_features)
    return projectors


class AVLLM(nnx.Module):
    def __init__(self, config: AVLLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        # Each part of PARTS, None when the config lacks it.
        self.vision = clip_vision.CLIPVision(config.vision, rngs=rngs) if config.vision else None
        # The audio encoder is the module of its config's kind (AUDIO_ENCODERS).
        self.audio: htsat.HTSAT | whisper.WhisperEncoder | None = (
            AUDIO_ENCODERS[config.audio.kind][1](config.audio, rngs=rngs) if config.audio else None
        )
        self.llm = llama.Llama(config.llm, rngs=rngs) if config.llm else None
        # The projectors the parts call for (make_projectors), None otherwise.
        projectors = make_projectors(config, rngs=rngs)
        self.temporal_proj: layers.Dense | None = projectors.get("temporal_proj")
        self.spatial_proj: layers.Dense | None = projectors.get("spatial_proj")
        self.audio_proj: layers.Dense | None = projectors.get("audio_proj")

    @property
    def language_model(self) -> llama.Llama:
        """The LLM; ValueError for a model without one (a checkpoint of encoders only)."""
        if self.llm is None:
            raise ValueError("the model has no LLM: its checkpoint holds encoders only")
        return self.llm

    # -- the modality table --------------------------------------------------------------

    def encoder_outputs(self, batch: dict) -> dict:
        """What the projectors read of a pack (ENCODER_OUTPUTS): computed by the encoders from
        `frames` and `audio_features`, or taken from the batch when a feature cache
        (data/feature_cache.py) stored them."""
        outputs = {name: batch[name] for name in ENCODER_OUTPUTS if name in batch}
        if self.vision is not None and "frames" in batch:
            frames = batch["frames"]  # uint8 [P, F, S, S, 3]
            packs, num_frames = frames.shape[:2]
            pixels = clip_vision.normalize_frames(frames.reshape(packs * num_frames, *frames.shape[2:]))
            pixels = layers.constrain(pixels, ("batch", None, None, None))  # the frames of a device's own packs
            # No stop_gradient: when the encoder is frozen it is not among the differentiated
            # parameters, so no backward pass is built for it; when a config trains it, it trains.
            hidden = self.vision(pixels)  # [P*F, 1+N, Dv]
            hidden = hidden.reshape(packs, num_frames, *hidden.shape[1:])
            # Each item's mean over its frames: a [F, items] averaging matrix per pack.
            item_frames = batch["item_frames"]  # [P, V]
            membership = jax.nn.one_hot(
                batch["frame_item"], item_frames.shape[1], dtype=jnp.float32
            )  # empty (-1): zeros
            weights = (membership / jnp.maximum(item_frames[:, None, :], 1)).astype(hidden.dtype)
            outputs["frame_cls"] = hidden[:, :, 0]
            outputs["item_patches"] = jnp.einsum(
                "pfv,pfnd->pvnd", weights, hidden[:, :, 1:], preferred_element_type=jnp.float32
            )
        if self.audio is not None and "audio_features" in batch:
            outputs["audio_embeddings"] = self.audio_embeddings(batch)
        return outputs

    def modality_table(self, batch: dict) -> jax.Array:
        """A pack's modality rows [P, M, D_llm]: F temporal rows (each frame's CLS through W_t),
        visual_items x N spatial rows (each item's patch tokens averaged over its frames,
        through W_s), audio_clips x K audio rows (each segment's embedding, `audio_embeddings`,
        through W_a); see data/packing.py."""
        parts = self.projected_rows(batch)
        if not parts:
            raise ValueError(
                "the batch has neither media (frames, audio_features) nor cached features for the model's encoders"
            )
        return jnp.concatenate(list(parts.values()), axis=1)

    def projected_rows(self, batch: dict) -> dict[str, jax.Array]:
        """The modality table's rows by the projector that makes them, in the table's order:
        {"temporal_proj": [P, F, D], "spatial_proj": [P, V*N, D], "audio_proj": [P, A*K, D]},
        those the model and the batch have."""
        outputs = self.encoder_outputs(batch)
        dtype = layers.dtype_of(self.language_model.config.dtype)
        parts = {}
        # The projectors exist when the model has the encoder and the LLM (make_projectors).
        if self.temporal_proj is not None and self.spatial_proj is not None and "frame_cls" in outputs:
            temporal = self.temporal_proj(outputs["frame_cls"].astype(dtype))
            spatial = self.spatial_proj(outputs["item_patches"].astype(dtype))
            parts["temporal_proj"] = temporal
            parts["spatial_proj"] = spatial.reshape(temporal.shape[0], -1, temporal.shape[-1])
        if self.audio_proj is not None and "audio_embeddings" in outputs:
            pooled = outputs["audio_embeddings"]  # [P, A, K, Da]
            packs, clips, segments = pooled.shape[:3]
            parts["audio_proj"] = self.audio_proj(pooled.reshape(packs, clips * segments, -1).astype(dtype))
        return parts

    def audio_embeddings(self, batch: dict) -> jax.Array:
        """The K segment embeddings of each of a pack's audio clips, [P, A, K, Da].

        HTSAT encodes each segment's CLAP log-mel on its own (audio_features [P, A, K, C, Fr,
        64], audio_is_longer [P, A, K]). Whisper encodes each clip's 30 s log-mel window once
        (audio_features [P, A, mel, 3000]) and pools its frames over K spans of the real audio
        (audio_valid_frames [P, A, K], the clip's count repeated: K is its static width)."""
        features = batch["audio_features"]
        packs, clips = features.shape[:2]
        if isinstance(self.audio, whisper.WhisperEncoder):
            valid_frames = batch["audio_valid_frames"]
            flat = layers.constrain(features.reshape(packs * clips, *features.shape[2:]), ("batch", None, None))
            pooled = self.audio.audio_embeddings(flat, valid_frames[..., 0].reshape(-1), valid_frames.shape[-1])
        else:
            assert self.audio is not None  # called for a model with an audio encoder; not Whisper, so HTSAT
            segments = features.shape[2]
            flat = layers.constrain(
                features.reshape(packs * clips * segments, *features.shape[3:]), ("batch", None, None, None)
            )
            pooled = self.audio(flat, batch["audio_is_longer"].reshape(-1))
        return pooled.reshape(packs, clips, -1, pooled.shape[-1])

    def encoder_identity(self) -> tuple[dict[str, dict], dict[str, str]]:
        """What a feature cache's fingerprint records of the encoders: each one's config and a
        sha256 of its parameters (name, dtype, shape and bytes of each), by part name."""
        digests = {}
        for part in self.config.encoder_configs():
            digest = hashlib.sha256()
            for path, value in sorted(
                nnx.to_flat_state(nnx.state(getattr(self, part))), key=lambda item: tuple(map(str, item[0]))
            ):
                array = value.get_value()
                # On several hosts a sharded parameter is gathered whole on each.
                array = np.asarray(
                    array if array.is_fully_addressable else multihost_utils.process_allgather(array, tiled=True)
                )
                digest.update(f"{'.'.join(map(str, path))}:{array.dtype}:{array.shape};".encode())
                digest.update(np.ascontiguousarray(array).tobytes())
            digests[part] = digest.hexdigest()
        return self.config.encoder_configs(), digests

    # -- the multimodal sequence --------------------------------------------------------

    def embed_inputs(self, batch: dict) -> dict:
        """The LLM's inputs for a packed batch (data/packing.py) or an unpacked one (the
        pipeline's unpacked layout, which inference uses; `as_packs` lays it out as packs of one
        row): `inputs_embeds` [P*R, L, D], `positions`, `segment_ids`, `targets` (with labels)
        and `loss_group` [P*R, L]."""
        if "modality_index" not in batch:
            batch = self.as_packs(batch)
        table = self.modality_table(batch)
        packs, rows, length = batch["input_ids"].shape
        text = self.language_model.embed_tokens(batch["input_ids"].reshape(packs, rows * length))
        index = batch["modality_index"].reshape(packs, rows * length)
        gathered = jnp.take_along_axis(table, jnp.maximum(index, 0)[..., None], axis=1).astype(text.dtype)
        # `where`, not a sum: a modality row a sample lacks is never read, so its projector gets
        # an exactly-zero gradient from that sample.
        inputs_embeds = jnp.where((index >= 0)[..., None], gathered, text).reshape(packs * rows, length, -1)
        flat = lambda name: batch[name].reshape(packs * rows, length)
        out = {
            "inputs_embeds": layers.constrain(inputs_embeds, layers.RESIDUAL),
            "positions": flat("positions"),
            "segment_ids": flat("segment_ids"),
            "loss_group": flat("loss_group"),
        }
        if "targets" in batch:
            out["targets"] = flat("targets")
        return out

    def as_packs(self, batch: dict) -> dict:
        """An unpacked batch (frames [B, T, ...], one clip's audio arrays [B, ...], or their cached
        features frame_cls [B, T, Dv], item_patches [B, N, Dv], audio_embeddings [B, K, Da]; input_ids [B, L]
        with one modality token, token_mask, flags, optional labels) as B packs of one row of
        L - 1 + T + N + K positions, one visual item and one audio clip each. The rows of a
        modality the sample lacks stay in the row as padding (segment 0), so a prompt batch
        keeps one static shape; positions count only the kept rows."""
        input_ids, token_mask = batch["input_ids"], batch["token_mask"]
        batch_size, length = input_ids.shape
        sizes, streams = [], []
        packs: dict[str, jax.Array] = {}
        visual = next((name for name in ("frames", "frame_cls") if name in batch), None)
        if self.vision is not None and visual:
            num_frames = batch[visual].shape[1]
            packs.update(
                frame_item=jnp.broadcast_to(jnp.where(batch["has_visual"], 0, -1)[:, None], (batch_size, num_frames)),
                item_frames=jnp.where(batch["has_visual"], num_frames, 0)[:, None],
            )
            packs[visual] = batch[visual]
            if visual == "frame_cls":
                packs["item_patches"] = batch["item_patches"][:, None]
            sizes.append(num_frames + self.vision.config.num_patches)
            streams.append(batch["has_visual"])
        if self.audio is not None and ("audio_embeddings" in batch or "audio_features" in batch):
            if "audio_embeddings" in batch:  # cached: [B, K, Da]
                packs["audio_embeddings"] = batch["audio_embeddings"][:, None]
                sizes.append(batch["audio_embeddings"].shape[1])
            else:
                per_segment = (
                    "audio_valid_frames" if isinstance(self.audio, whisper.WhisperEncoder) else "audio_is_longer"
                )
                packs.update({name: batch[name][:, None] for name in ("audio_features", per_segment)})
                sizes.append(batch[per_segment].shape[1])
            streams.append(batch["has_audio"])
        if not sizes:
            raise ValueError("the batch has neither frames nor audio_features for the model's encoders")
        num_rows = sum(sizes)
        # Whether each modality slot's stream is present.
        stream_of_row = jnp.concatenate([jnp.full(size, i) for i, size in enumerate(sizes)])
        row_kept = jnp.stack(streams, axis=1)[:, stream_of_row]  # [B, num_rows]

        # Where the modality token sits; text-only samples put the (all dropped) rows at the end.
        is_modality_token = jnp.isin(input_ids, jnp.asarray(self.config.modality_token_ids))
        has_token = is_modality_token.any(axis=1)
        token_position = jnp.where(has_token, jnp.argmax(is_modality_token, axis=1), length)[:, None]
        row_kept &= has_token[:, None]

        out_length = length - 1 + num_rows
        slot = jnp.arange(out_length)[None, :]
        in_modality = (slot >= token_position) & (slot < token_position + num_rows)
        # The modality token itself is replaced: text after it shifts by num_rows - 1.
        text_index = jnp.clip(jnp.where(slot < token_position, slot, slot - num_rows + 1), 0, length - 1)
        modality_offset = jnp.clip(slot - token_position, 0, num_rows - 1)
        take = lambda x, index: jnp.take_along_axis(x, index, axis=1)
        is_kept_modality = in_modality & take(row_kept, modality_offset)
        kept = jnp.where(in_modality, is_kept_modality, take(token_mask, text_index))
        group = jnp.stack(
            [(batch["has_visual"] == m.has_visual) & (batch["has_audio"] == m.has_audio) for m in Modality]
            + [~batch["has_visual"] & ~batch["has_audio"]],
            axis=1,
        )
        packs.update(
            # With one item and one clip per pack, the table rows are the modality slots in order.
            input_ids=take(input_ids, text_index)[:, None],
            modality_index=jnp.where(is_kept_modality, modality_offset, -1)[:, None],
            segment_ids=kept.astype(jnp.int32)[:, None],
            positions=llama.kept_positions(kept)[:, None],
            loss_group=jnp.broadcast_to(jnp.argmax(group, axis=1)[:, None], kept.shape)[:, None],
        )
        if "labels" in batch:
            # Each text row predicts the next text token; shifting before the splice keeps the
            # target independent of which modality rows are dropped.
            next_labels = jnp.concatenate([batch["labels"][:, 1:], jnp.full((batch_size, 1), IGNORE_INDEX)], axis=1)
            packs["targets"] = jnp.where(in_modality | ~kept, IGNORE_INDEX, take(next_labels, text_index))[:, None]
        return packs

    def __call__(self, batch: dict, *, return_hidden_states: bool = False) -> tuple[jax.Array, dict]:
        """Logits [B, L', V] (or final hidden states) and the spliced inputs (targets included)."""
        inputs = self.embed_inputs(batch)
        outputs = self.language_model(
            inputs_embeds=inputs["inputs_embeds"],
            positions=inputs["positions"],
            segment_ids=inputs["segment_ids"],
            return_hidden_states=return_hidden_states,
        )
        return outputs, inputs
