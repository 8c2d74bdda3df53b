"""Packing: whole samples into fixed-size packs, so that a step computes real tokens and
present media only.

A pack is the unit a step's batch is made of (`global_batch_size` counts packs when packing
is on). It holds `rows` LLM rows of `row_length` positions and media slots for the encoders:
`frames` ViT frames shared by up to `visual_items` videos and images (a video takes
`num_frames` frames, a still image one: ViT cost is per frame, so one frame budget serves any
mix of images and videos without a second number to tune), and `audio_clips` clips of K
segments each. Samples go into packs whole; which pack and which row is data/packer.py's
choice (a look-ahead window over the shuffled samples), this module lays a pack's arrays out.

The arrays of a pack (`assemble`), leading dimension P when batched:

    frames          uint8   [P, F, S, S, 3]     the packed frames; zeros in empty slots
                                                (from a feature cache, instead: frame_cls
                                                [P, F, Dv], item_patches [P, V, N, Dv] and
                                                audio_embeddings [P, A, K, Da]; see
                                                data/feature_cache.py)
    frame_item      int32   [P, F]              visual item of each frame; -1 for empty slots
    item_frames     int32   [P, V]              frames of each visual item (0: an empty slot)
    audio_features  float32 [P, A, K, C, Fr, 64]  CLAP log-mel of each segment (an HTSAT model)
    audio_is_longer bool    [P, A, K]
      or, for a Whisper model:
    audio_features  float32 [P, A, mel, 3000]   Whisper log-mel of each clip
    audio_valid_frames int32 [P, A, K]          its real encoder frames, repeated K times
    input_ids       int32   [P, R, L]           text ids; the pad id elsewhere
    modality_index  int32   [P, R, L]           row of the pack's modality table that fills a
                                                position, -1 for text and padding (below)
    segment_ids     int32   [P, R, L]           1, 2, ... for the samples of a row; 0 padding
    positions       int32   [P, R, L]           from 0 in each sample
    targets         int32   [P, R, L]           the next text token, IGNORE_INDEX elsewhere
    loss_group      int32   [P, R, L]           the sample's index in LOSS_GROUPS
    work            float32 [P, len(WORK)]      the useful work of the pack's samples (flops.py)

The modality table of a pack has F temporal rows (each frame's CLS through W_t), then
visual_items x N spatial rows (each item's patches averaged over its frames, through W_s),
then audio_clips x K audio rows. A still image's T temporal rows all read its one frame.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from avllm_jax.modality import IGNORE_INDEX, LOSS_GROUPS, Modality

# A sample's per-frame array, whose length is its frame count: decoded frames, or cached CLS tokens.
FRAME_ARRAYS = ("frames", "frame_cls")
# Per-sample counts of the work that matters, summed per pack: samples, LLM positions, their
# squares (causal attention), ViT frames, visual items, audio clips (what a Whisper encoder
# costs) and their segments (what an HTSAT costs).
WORK = (
    "samples",
    "llm_tokens",
    "llm_tokens_squared",
    "encoded_frames",
    "visual_items",
    "audio_clips",
    "audio_segments",
)


@dataclasses.dataclass(frozen=True)
class ModalityRows:
    """LLM rows a modality takes: T temporal + N spatial for the visual stream, K audio. A
    model without an encoder has 0 rows for it (its stream is then not used)."""

    temporal: int
    spatial: int
    audio: int

    @classmethod
    def of(cls, model_config, data_config) -> ModalityRows:
        vision, audio = model_config.vision, model_config.audio
        return cls(
            temporal=data_config.num_frames if vision else 0,
            spatial=vision.num_patches if vision else 0,
            audio=data_config.num_audio_segments if audio else 0,
        )

    def visual(self) -> int:
        return self.temporal + self.spatial

    def count(self, modality: Modality | None) -> int:
        if modality is None:
            return 0
        return self.visual() * modality.has_visual + self.audio * modality.has_audio


@dataclasses.dataclass(frozen=True)
class PackBudget:
    rows: int
    row_length: int
    frames: int
    visual_items: int
    audio_clips: int

    @classmethod
    def from_config(cls, packing_config) -> PackBudget:
        return cls(**{field.name: int(packing_config[field.name]) for field in dataclasses.fields(cls)})

    def problem(self, modality_rows: ModalityRows, num_frames: int) -> str | None:
        """Why some sample could never fit this budget, or None."""
        if min(self.rows, self.row_length) < 1:
            return f"rows={self.rows} and row_length={self.row_length} must be >= 1"
        if self.row_length <= modality_rows.visual() + modality_rows.audio:
            return (
                f"row_length={self.row_length} leaves no text beside an audio-visual sample's "
                f"{modality_rows.visual() + modality_rows.audio} modality rows"
            )
        if modality_rows.visual() and (self.visual_items < 1 or self.frames < num_frames):
            return (
                f"frames={self.frames}, visual_items={self.visual_items}: "
                f"a video needs num_frames={num_frames} frames and an item"
            )
        if modality_rows.audio and self.audio_clips < 1:
            return "audio_clips=0, but the model has an audio encoder"
        return None


def budget_of(data_config, modality_rows: ModalityRows | None) -> PackBudget:
    """The packing budget of a data config; ValueError when some sample could never fit it."""
    if modality_rows is None:
        raise ValueError("packing needs the model's modality_rows")
    budget = PackBudget.from_config(data_config.packing)
    if problem := budget.problem(modality_rows, data_config.num_frames):
        raise ValueError(f"data.packing: {problem}")
    return budget


@dataclasses.dataclass
class Footprint:
    """What a sample takes of a pack."""

    length: int  # LLM positions
    frames: int  # 0, 1 (a still) or num_frames
    audio_clips: int  # 0 or 1


def footprint(sample: dict, modality_rows: ModalityRows) -> Footprint:
    """Of a prepared sample: its ids (modality token included), its frames and its flags."""
    modality = Modality.from_flags(
        sample["has_visual"] and modality_rows.visual() > 0, sample["has_audio"] and modality_rows.audio > 0
    )
    has_token = sample["modality_token_at"] >= 0
    length = sample["input_ids"].size - has_token + modality_rows.count(modality)
    frames = (
        sample[next(n for n in FRAME_ARRAYS if n in sample)].shape[0]
        if modality is not None and modality.has_visual
        else 0
    )
    return Footprint(length, frames, int(modality is not None and modality.has_audio))


def check_places(needs: list[Footprint], places: list[tuple[int, int]], budget: PackBudget) -> None:
    """ValueError unless the samples at these (row, offset) places fit the pack without overlap."""
    b = budget
    frames = sum(n.frames for n in needs)
    items = sum(n.frames > 0 for n in needs)
    clips = sum(n.audio_clips for n in needs)
    if len(places) != len(needs) or frames > b.frames or items > b.visual_items or clips > b.audio_clips:
        raise ValueError(f"samples needing {frames} frames, {items} items, {clips} clips do not fit one pack of {b}")
    end = [0] * b.rows
    for need, (row, offset) in zip(needs, places):
        if not 0 <= row < b.rows or offset < end[row] or offset + need.length > b.row_length:
            raise ValueError(f"a sample of {need.length} positions at row {row}, offset {offset} does not fit {b}")
        end[row] = offset + need.length


def sample_work(need: Footprint, modality_rows: ModalityRows) -> np.ndarray:
    return np.array(
        [
            1,
            need.length,
            need.length**2,
            need.frames,
            need.frames > 0,
            need.audio_clips,
            need.audio_clips * modality_rows.audio,
        ],
        np.float32,
    )


def assemble(
    samples: list[dict],
    places: list[tuple[int, int]],
    budget: PackBudget,
    modality_rows: ModalityRows,
    pad_id: int,
    media_shapes: dict,
) -> dict:
    """The arrays of one pack (module docstring) from prepared samples and the (row, offset)
    data/packer.py gave each; a row's samples come in the order of their offsets.

    media_shapes: the shapes and dtypes of the arrays kept per frame, per visual item and per
    audio clip (samples.media_shapes), for empty packs too."""
    b, r = budget, modality_rows
    needs = [footprint(s, r) for s in samples]
    check_places(needs, places, budget)
    shape = (b.rows, b.row_length)
    out = dict(
        frame_item=np.full(b.frames, -1, np.int32),
        item_frames=np.zeros(b.visual_items, np.int32),
        input_ids=np.full(shape, pad_id, np.int32),
        modality_index=np.full(shape, -1, np.int32),
        segment_ids=np.zeros(shape, np.int32),
        positions=np.zeros(shape, np.int32),
        targets=np.full(shape, IGNORE_INDEX, np.int32),
        loss_group=np.zeros(shape, np.int32),
        work=np.zeros(len(WORK), np.float32),
    )
    slots = {"frame": b.frames, "item": b.visual_items, "audio": b.audio_clips}
    for kind, count in slots.items():
        for name, (shape, dtype) in media_shapes[kind].items():
            out[name] = np.zeros((count, *shape), dtype)
    spatial_start, audio_start = b.frames, b.frames + b.visual_items * r.spatial
    frame, item, clip = 0, 0, 0
    samples_in_row = [0] * b.rows
    for sample, need, (row, offset) in zip(samples, needs, places):
        samples_in_row[row] += 1
        table_rows: list[int] = []  # table index of each modality row, in order
        if need.frames:
            for name in media_shapes["frame"]:
                out[name][frame : frame + need.frames] = sample[name][: need.frames]
            for name in media_shapes["item"]:
                out[name][item] = sample[name]
            out["frame_item"][frame : frame + need.frames] = item
            out["item_frames"][item] = need.frames
            temporal = frame + (np.arange(r.temporal) if need.frames > 1 else np.zeros(r.temporal, int))
            table_rows += [*temporal, *(spatial_start + item * r.spatial + np.arange(r.spatial))]
            frame, item = frame + need.frames, item + 1
        if need.audio_clips:
            for name in media_shapes["audio"]:
                out[name][clip] = sample[name]
            table_rows += [*(audio_start + clip * r.audio + np.arange(r.audio))]
            clip += 1
        ids, labels, token_at = sample["input_ids"], sample["labels"], int(sample["modality_token_at"])
        # Each text position predicts the next text token (the modality token's label is ignored).
        next_labels = np.append(labels[1:], IGNORE_INDEX)
        if token_at < 0:
            token_at = ids.size  # text only: no modality rows
        text_ids = np.concatenate([ids[:token_at], np.full(len(table_rows), pad_id), ids[token_at + 1 :]])
        targets = np.concatenate(
            [next_labels[:token_at], np.full(len(table_rows), IGNORE_INDEX), next_labels[token_at + 1 :]]
        )
        index = np.concatenate([np.full(token_at, -1), table_rows, np.full(max(ids.size - token_at - 1, 0), -1)])
        span = slice(offset, offset + need.length)
        out["input_ids"][row, span] = text_ids
        out["targets"][row, span] = targets
        out["modality_index"][row, span] = index
        out["segment_ids"][row, span] = samples_in_row[row]
        out["positions"][row, span] = np.arange(need.length)
        out["loss_group"][row, span] = LOSS_GROUPS.index(loss_group_name(sample))
        out["work"] += sample_work(need, r)
    return out


def loss_group_name(sample: dict) -> str:
    modality = Modality.from_flags(sample["has_visual"], sample["has_audio"])
    return "text" if modality is None else modality.value
