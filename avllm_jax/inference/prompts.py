"""Prompts about media: each row is built as a training sample is (`samples.build_sample`),
from a conversation that stops before the answer, so its ids are the training ids up to the
last "ASSISTANT:".

    inference_data_config(model, checkpoint_dir)
                        the media settings the model is fed with
    add_media_arguments(parser), media_overrides(args)
                        the command-line flags that override them (chat, web, evaluate)
    resolve_modality(media, forced), missing_part(model, modality)
                        the modality of a prompt about one file; the part of the model it lacks
    conversation_batch(model, tokenizer, media, turns, modalities)
                        a right-padded model batch of conversations that end with a question
    answer_conversations(...), answer_questions(model, tokenizer, media, questions)
                        those prompts answered in one `generate` batch, decoded
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from avllm_jax.checkpoint import read_data_config
from avllm_jax.data import conversation, feature_cache, features, pipeline, samples
from avllm_jax.data.feature_cache import CachedMedia
from avllm_jax.data.media import Media
from avllm_jax.errors import AvllmError
from avllm_jax.inference.generate import generate
from avllm_jax.modality import Modality
from avllm_jax.models.avllm import AVLLM, AVLLMConfig
from avllm_jax.models.htsat import HTSATConfig

# Prompts are right-padded to a multiple of this many tokens, so that prompts of similar
# length share one compiled program.
PROMPT_BUCKET = 32


def inference_data_config(
    model: AVLLM | AVLLMConfig, checkpoint_dir: str | None = None, **overrides
) -> ml_collections.ConfigDict:
    """The media settings the model (or, before its weights load, its config) is fed with at inference.

    A training workdir's saved data settings when `checkpoint_dir` is one; otherwise the
    pipeline's defaults fitted to the encoders: the vision encoder's input size, the audio
    truncation its HTSAT takes ('fusion', 4 channels, for a fused one; 'rand_trunc'
    otherwise), and CLAP's 10 s window, or the longest the HTSAT's spectrogram takes when that
    is shorter; for a Whisper encoder, Whisper's 16 kHz front end with its mel bins. Then
    `overrides` (None values are ignored). Audio settings the encoder cannot take are a
    ValueError that names the fitting ones.
    """
    model_config = model.config if isinstance(model, AVLLM) else model
    config = read_data_config(checkpoint_dir) if checkpoint_dir else None
    audio = model_config.audio
    if config is None:
        config = pipeline.default_data_config()
        if model_config.vision is not None:
            config.image_size = model_config.vision.image_size
        if isinstance(audio, HTSATConfig):
            config.audio_truncation = "fusion" if audio.enable_fusion else "rand_trunc"
            config.audio_max_length_s = min(
                config.audio_max_length_s, features.longest_audio_window_s(audio.max_frames, config)
            )
        elif audio is not None:  # a Whisper encoder
            config.update(
                audio_front_end="whisper",
                audio_sample_rate=features.WHISPER_SAMPLE_RATE,
                whisper_mel_bins=audio.num_mel_bins,
            )
    config.feature_cache = None  # a training run's cache holds its own data's files; --feature-cache names one
    config.update({k: v for k, v in overrides.items() if v is not None})
    if audio is not None and (problem := features.audio_settings_problem(config, audio)):
        raise ValueError(f"{problem} (--audio-window-s, --audio-truncation)")
    return config


def add_media_arguments(parser: argparse.ArgumentParser, *, feature_cache: bool = True) -> None:
    """The flags that override each media setting of `inference_data_config` (and, with
    `feature_cache`, name a cache to read the files' encoder outputs from)."""
    default = "default: the checkpoint's training setting, else"
    parser.add_argument("--num-frames", type=int, default=None, help=f"frames sampled from a video ({default} 32)")
    parser.add_argument("--num-audio-segments", type=int, default=None, help=f"audio segments per clip ({default} 4)")
    parser.add_argument(
        "--image-size", type=int, default=None, help=f"frame size in pixels ({default} the vision encoder's input size)"
    )
    parser.add_argument(
        "--audio-window-s",
        type=float,
        default=None,
        help=f"seconds of audio per segment ({default} CLAP's 10 s, or the longest the HTSAT takes)",
    )
    parser.add_argument(
        "--audio-truncation",
        choices=["fusion", "rand_trunc"],
        default=None,
        help=f"how a long segment is cut ({default} what the HTSAT takes: fusion for a fused one)",
    )
    if feature_cache:
        parser.add_argument(
            "--feature-cache",
            default=None,
            help="a feature cache (tools/cache_features.py) holding the media files' encoder outputs, read "
            "instead of decoding them; it must be of this checkpoint's encoders and media settings",
        )


def media_overrides(args: argparse.Namespace) -> dict:
    """`add_media_arguments`' flags as `inference_data_config` overrides."""
    return dict(
        num_frames=args.num_frames,
        num_audio_segments=args.num_audio_segments,
        image_size=args.image_size,
        audio_max_length_s=args.audio_window_s,
        audio_truncation=args.audio_truncation,
        feature_cache=getattr(args, "feature_cache", None),
    )


def data_config_from_args(model_config: AVLLMConfig, args: argparse.Namespace) -> ml_collections.ConfigDict:
    """`inference_data_config` of `args.checkpoint` with `add_media_arguments`' flags, checked
    before the weights load: media settings the encoders cannot take are an AvllmError."""
    try:
        return inference_data_config(model_config, args.checkpoint, **media_overrides(args))
    except ValueError as error:
        raise AvllmError(str(error)) from None


def open_feature_cache(model: AVLLM, data_config) -> feature_cache.FeatureCache | None:
    """data_config's feature cache, checked against the model's encoders and the media
    settings (FeatureCacheError, a ValueError, when it does not match); None without one."""
    if not data_config.feature_cache:
        return None
    cache = feature_cache.FeatureCache(data_config.feature_cache)
    cache.check(feature_cache.fingerprint(data_config, *model.encoder_identity()))
    return cache


def _fit_config_to_media(
    config: ml_collections.ConfigDict, media: Sequence[Media | CachedMedia]
) -> ml_collections.ConfigDict:
    """Frame count, image size and audio segment count as the media were decoded (all alike;
    cached features are as the cache's settings, which match the config's)."""
    config = ml_collections.ConfigDict(config.to_dict())
    decoded = [m for m in media if isinstance(m, Media)]
    seen = {
        "num_frames": {m.frames.shape[0] for m in decoded if m.frames is not None and m.frames.shape[0] > 1},
        "image_size": {m.frames.shape[1] for m in decoded if m.frames is not None},
        "num_audio_segments": {m.audio.shape[0] for m in decoded if m.audio is not None},
    }
    for name, values in seen.items():
        if len(values) > 1:
            raise ValueError(f"the media of one batch were decoded with different {name}: {sorted(values)}")
        if values:
            setattr(config, name, values.pop())
    return config


def resolve_modality(media: Media | CachedMedia, forced: str | None, name: str = "the media") -> Modality:
    """The modality a prompt about `media` uses: `forced`, or the streams the file has."""
    if forced is None:
        modality = Modality.from_flags(media.has_visual, media.has_audio)
        if modality is None:
            raise ValueError(f"{name} has no video or audio stream to use")
        return modality
    if forced not in list(Modality):
        raise ValueError(f"unknown modality {forced!r}; expected one of {[m.value for m in Modality]}")
    forced = Modality(forced)
    streams = (
        ("a video stream", forced.has_visual, media.has_visual),
        ("an audio stream", forced.has_audio, media.has_audio),
    )
    missing = [stream for stream, need, has in streams if need and not has]
    if missing:
        raise ValueError(f"modality {forced!r} needs {' and '.join(missing)}, which {name} lacks")
    return forced


def missing_part(model: AVLLM, modality: Modality) -> str | None:
    """The encoder or LLM a prompt of `modality` needs that the model lacks, or None."""
    parts = (
        ("vision encoder", modality.has_visual, model.vision),
        ("audio encoder", modality.has_audio, model.audio),
        ("LLM", True, model.llm),
    )
    return next((name for name, needed, part in parts if needed and part is None), None)


def conversation_batch(
    model: AVLLM,
    tokenizer,
    media: Sequence[Media | CachedMedia],
    turns: Sequence[list[tuple[str, str]]],
    modalities: Sequence[str | None],
    data_config: ml_collections.ConfigDict | None = None,
) -> dict:
    """A right-padded model batch of conversations about media, each ending with a user turn.

    A modality the file lacks raises ValueError (a training sample would be re-routed; a
    prompt is refused). Rows are padded to a multiple of PROMPT_BUCKET; the batch keeps the
    training sample's other arrays (labels, on earlier answers; num_rerouted), which
    `generate` ignores.
    """
    config = _fit_config_to_media(data_config or inference_data_config(model), media)
    rows = []
    for i, (item, item_turns, modality) in enumerate(zip(media, turns, modalities, strict=True)):
        if item_turns[-1][0] != conversation.USER_ROLE:
            raise ValueError(f"conversation {i} ends with an answer; a prompt ends with a user turn")
        modality = resolve_modality(item, modality, f"media item {i}")
        # A fixed seed: the same audio crop every time the same prompt is asked.
        rows.append(samples.build_sample(item_turns, item, modality, config, tokenizer, rng=np.random.default_rng(0)))
    length = -(-max(row["input_ids"].size for row in rows) // PROMPT_BUCKET) * PROMPT_BUCKET
    rows = [samples.pad_text(row, length, tokenizer) for row in rows]
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def decode_answer(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


def answer_conversations(
    model: AVLLM,
    tokenizer,
    media: Sequence[Media | CachedMedia],
    turns: Sequence[list[tuple[str, str]]],
    modalities: Sequence[str | None],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    data_config: ml_collections.ConfigDict | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> list[str]:
    """The next answer of each conversation (see conversation_batch), generated in one batch
    (its rows split over `mesh`'s devices when given; see `generate`)."""
    if not media:
        return []
    batch = conversation_batch(model, tokenizer, media, turns, modalities, data_config)
    tokens, lengths = jax.device_get(
        generate(
            model,
            batch,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            rng=rng,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            mesh=mesh,
        )
    )
    return [decode_answer(tokenizer, row[:length]) for row, length in zip(tokens, lengths)]


def answer_questions(
    model: AVLLM,
    tokenizer,
    media: Sequence[Media | CachedMedia],
    questions: Sequence[str],
    *,
    modality: Sequence[str | None] | None = None,
    **options,
) -> list[str]:
    """One answer per (media, question), each question the first user turn of a conversation.

    modality: per item 'visual', 'audio' or 'audio_visual'; None follows each file's streams.
    A forced modality whose stream the file lacks raises ValueError. `options`: those of
    answer_conversations (max_new_tokens, temperature, top_k, top_p, rng, data_config, mesh).
    """
    if len(media) != len(questions) or (modality is not None and len(modality) != len(media)):
        raise ValueError(
            f"{len(media)} media, {len(questions)} questions and {len(modality or media)} modalities differ in number"
        )
    modalities = [
        resolve_modality(m, None if modality is None else modality[i], f"media item {i}") for i, m in enumerate(media)
    ]
    turns = [[(conversation.USER_ROLE, conversation.first_user_message(q, m))] for q, m in zip(questions, modalities)]
    return answer_conversations(model, tokenizer, media, turns, modalities, **options)
