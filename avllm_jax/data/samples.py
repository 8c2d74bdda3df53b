"""One sample's arrays, as training and inference both build them: decoded media, the audio
encoder's features (CLAP's or Whisper's log-mel), the re-routing of a request for a stream the
file lacks, token ids and labels.

`build_sample` is the one path from turns and media to model inputs: the training pipeline
(data/pipeline.py) builds its samples here and chat, evaluation and the web demo their prompts.
"""

from __future__ import annotations

import os

import av
import numpy as np

from avllm_jax.data import conversation, feature_cache, features, packing
from avllm_jax.data.feature_cache import CachedMedia
from avllm_jax.data.media import Media, MediaError, load_media
from avllm_jax.modality import IGNORE_INDEX, Modality


def load_file_media(path: str | os.PathLike, config) -> Media:
    """The media of `path`, decoded with the data config's frame count, image size and audio settings."""
    return load_media(
        path,
        num_frames=config.num_frames,
        image_size=config.image_size,
        num_audio_segments=config.num_audio_segments,
        audio_sample_rate=config.audio_sample_rate,
    )


def declared_duration(path: str | os.PathLike) -> float | None:
    """The duration the container's header declares, read without decoding; None if it says none."""
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            return container.duration / av.time_base if container.duration else None
    except (av.FFmpegError, OSError, UnicodeDecodeError):
        return None  # load_media says why the file cannot be read


def load_limited_media(path: str | os.PathLike, config, max_duration_s: float) -> Media:
    """`load_file_media`, refusing a file longer than `max_duration_s` (MediaError, as for one
    that cannot be decoded). The header's duration is checked first, so that a long file is
    refused before it is decoded. For files a user sends (the web page, the server)."""
    too_long = f"{path}: {{:.1f}} s long, over the limit of {max_duration_s:g} s"
    declared = declared_duration(path)
    if declared is not None and declared > max_duration_s:
        raise MediaError(too_long.format(declared))
    media = load_file_media(path, config)
    if media.duration_s > max_duration_s:
        raise MediaError(too_long.format(media.duration_s))
    return media


def load_sample_media(path: str | os.PathLike, config, cache: feature_cache.FeatureCache | None) -> Media | CachedMedia:
    """A sample's media: decoded from `path`, or its features from `cache` (the data config's
    feature_cache) when there is one. MediaError either way when the file is unusable."""
    return cache.lookup(path) if cache is not None else load_file_media(path, config)


def media_arrays(media: Media | CachedMedia | None, config, *, use_visual=True, use_audio=True, rng=None) -> dict:
    """Fixed-shape model inputs of one sample's media; absent or unused streams give zeros.
    With a feature cache (config.feature_cache), the cached features instead of the media:
    frame_cls [T, Dv] (a still's one row repeated), item_patches [N, Dv], audio_embeddings [K, Da]."""
    has_visual = bool(media is not None and media.has_visual and use_visual)
    has_audio = bool(media is not None and media.has_audio and use_audio)
    if config.get("feature_cache"):
        assert not isinstance(media, Media), "with a feature cache, load_sample_media gives CachedMedia"
        return _cached_arrays(media, config, has_visual, has_audio)
    assert not isinstance(media, CachedMedia), "CachedMedia needs the config's feature_cache"
    t, s = config.num_frames, config.image_size
    frames = np.zeros((t, s, s, 3), np.uint8)
    if media is not None and has_visual:
        frames[:] = media.frames  # a still (T = 1) broadcasts over the T frames
    audio = audio_arrays(media.audio if media is not None and has_audio else None, config, rng=rng)
    return dict(frames=frames, **audio, has_visual=np.bool_(has_visual), has_audio=np.bool_(has_audio))


def _cached_arrays(media: CachedMedia | None, config, has_visual: bool, has_audio: bool) -> dict:
    shapes = feature_cache.read_shapes(config.feature_cache)
    out = {}
    if "frame_cls" in shapes:
        (width,), dtype = shapes["frame_cls"]
        out["frame_cls"] = np.zeros((config.num_frames, width), dtype)
        out["item_patches"] = np.zeros(*shapes["item_patches"])
        if media is not None and has_visual:
            out["frame_cls"][:] = media.arrays["frame_cls"]  # a still (one row) broadcasts over the T frames
            out["item_patches"][:] = media.arrays["item_patches"]
    if "audio_embeddings" in shapes:
        out["audio_embeddings"] = (
            media.arrays["audio_embeddings"].copy()
            if media is not None and has_audio
            else np.zeros(*shapes["audio_embeddings"])
        )
    return dict(out, has_visual=np.bool_(has_visual), has_audio=np.bool_(has_audio))


def audio_arrays(segments: np.ndarray | None, config, *, rng=None) -> dict:
    """One clip's audio encoder inputs from its K waveform segments [K, L] (None: zeros), as
    `config.audio_front_end` asks: CLAP's log-mel of each segment (audio_features [K, C, Fr, 64],
    audio_is_longer [K]) for an HTSAT, or Whisper's log-mel of the whole clip (audio_features
    [mel, 3000]) and its count of real encoder frames (audio_valid_frames [K], repeated)."""
    k = config.num_audio_segments
    if config.audio_front_end == "whisper":
        if segments is None:
            return dict(
                audio_features=np.zeros((config.whisper_mel_bins, features.WHISPER_FRAMES), np.float32),
                audio_valid_frames=np.zeros(k, np.int32),
            )
        mel, valid_frames = features.whisper_audio_features(
            segments.reshape(-1), config.whisper_mel_bins, sampling_rate=config.audio_sample_rate
        )
        return dict(audio_features=mel, audio_valid_frames=np.full(k, valid_frames, np.int32))
    if segments is None:
        return dict(
            audio_features=np.zeros(
                (k, features.audio_channels(config), features.audio_frames(config), features.NUM_MEL_BINS), np.float32
            ),
            audio_is_longer=np.zeros(k, bool),
        )
    mel, is_longer = features.clap_audio_features(
        segments,
        truncation=config.audio_truncation,
        padding=config.audio_padding,
        max_length_s=config.audio_max_length_s,
        sampling_rate=config.audio_sample_rate,
        rng=rng,
    )
    return dict(audio_features=mel, audio_is_longer=is_longer)


def routed_modality(modality: Modality | None, media: Media | CachedMedia | None) -> tuple[Modality | None, bool]:
    """The modality a sample is built with, and whether it was re-routed: `modality` when the
    file has its streams, else the streams the file has. MediaError when it has none."""
    if modality is None:
        return None, False
    if media is None:
        raise ValueError(f"a sample that asks for {modality!r} has no media")
    used = Modality.from_flags(modality.has_visual and media.has_visual, modality.has_audio and media.has_audio)
    if used == modality:
        return used, False
    used = used or Modality.from_flags(media.has_visual, media.has_audio)
    if used is None:  # an audio stream with fewer samples than segments counts as none
        raise MediaError("the file has no video or audio stream to use")
    return used, True


def build_sample(
    turns: list[tuple[str, str]],
    media: Media | CachedMedia | None,
    modality: Modality | None,
    config,
    tokenizer,
    *,
    rng: np.random.Generator,
    max_length: int | None = None,
) -> dict:
    """One sample's media arrays, unpadded int32 input_ids and labels, num_rerouted and
    num_truncated.

    Training builds its samples and inference its prompts here: turns that end with an answer
    make a training sample, turns that end with a user turn a prompt whose ids end with
    "ASSISTANT:". `modality` is what the first turn's token asks for (None: text only); when
    `media` lacks a stream it needs, the sample is re-routed to the streams the file has and
    its token rewritten (num_rerouted 1). `rng` draws the audio crop. Raises MediaError when
    the file has no stream, PromptTooLongError when the modality token falls past `max_length`.
    """
    used, rerouted = routed_modality(modality, media)
    if rerouted:
        assert used is not None  # a sample is re-routed to the streams its file has
        turns = conversation.with_modality(turns, used)
    if used is not None:
        arrays = media_arrays(media, config, use_visual=used.has_visual, use_audio=used.has_audio, rng=rng)
    else:
        arrays = media_arrays(None, config)
    ids, labels = conversation.tokenize_turns(turns, tokenizer)
    num_truncated = int(max_length is not None and ids.size > max_length)
    ids, labels = conversation.truncate(ids, labels, max_length, tokenizer)
    return dict(
        arrays, input_ids=ids, labels=labels, num_rerouted=np.int32(rerouted), num_truncated=np.int32(num_truncated)
    )


def pad_text(sample: dict, length: int, tokenizer) -> dict:
    """`sample` with input_ids and labels right-padded to `length` and its token_mask."""
    ids, labels = sample["input_ids"], sample["labels"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = np.full(length, pad_id, np.int32)
    padded_labels = np.full(length, IGNORE_INDEX, np.int32)
    input_ids[: ids.size], padded_labels[: ids.size] = ids, labels
    return dict(sample, input_ids=input_ids, labels=padded_labels, token_mask=np.arange(length) < ids.size)


def media_shapes(data_config) -> dict:
    """The shapes and dtypes ({name: (shape, dtype)}) of the arrays a pack keeps per frame
    ('frame'), per visual item ('item') and per audio clip ('audio'): decoded frames and the
    audio encoder's inputs (as `audio_arrays` gives them), or a feature cache's features."""
    if data_config.get("feature_cache"):
        shapes = feature_cache.read_shapes(data_config.feature_cache)
        kinds = dict(frame="frame_cls", item="item_patches", audio="audio_embeddings")
        return {kind: {name: shapes[name]} if name in shapes else {} for kind, name in kinds.items()}
    audio = audio_arrays(None, data_config)
    return dict(
        frame={"frames": ((data_config.image_size, data_config.image_size, 3), np.dtype(np.uint8))},
        item={},
        audio={name: (array.shape, array.dtype) for name, array in audio.items()},
    )


def example_batch_element(data_config, modality_rows: packing.ModalityRows) -> dict:
    """One element of a training batch (a pack, or a padded sample) with the right shapes and
    dtypes, for compiling ahead of time."""
    if data_config.packing.enabled:
        return packing.assemble(
            [], [], packing.budget_of(data_config, modality_rows), modality_rows, 0, media_shapes(data_config)
        )
    text = np.zeros(data_config.max_text_length, np.int32)
    return media_arrays(None, data_config) | dict(
        input_ids=text, labels=text, token_mask=text.astype(bool), work=np.zeros(len(packing.WORK), np.float32)
    )
