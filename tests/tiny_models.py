"""A tiny audio-visual model and hand-made batches for the model and training tests."""

import numpy as np
from flax import nnx
from hf_reference import TOKENIZER_CORPUS

from avllm_jax.data import conversation
from avllm_jax.modality import IGNORE_INDEX, MODALITY_TOKENS, Modality
from avllm_jax.models import avllm, clip_vision, htsat, llama, whisper

NUM_FRAMES, NUM_SEGMENTS, AUDIO_FRAMES = 2, 2, 64
TINY_HTSAT = htsat.HTSATConfig(spec_size=64, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2))


def tiny_tokenizer():
    tokenizer = conversation.train_tokenizer(TOKENIZER_CORPUS * 4, vocab_size=300)
    conversation.add_modality_tokens(tokenizer)
    return tokenizer


def tiny_config(tokenizer, *, audio_kind="htsat") -> avllm.AVLLMConfig:
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in MODALITY_TOKENS)
    return avllm.AVLLMConfig(
        vision=clip_vision.PRESETS["tiny"],
        audio={"htsat": TINY_HTSAT, "whisper": whisper.PRESETS["tiny"]}[audio_kind],
        llm=llama.LlamaConfig(**{**llama.PRESETS["tiny"].__dict__, "vocab_size": len(tokenizer)}),
        modality_token_ids=ids,
    )


def tiny_model(tokenizer, seed=0, *, audio_kind="htsat") -> avllm.AVLLM:
    return avllm.AVLLM(tiny_config(tokenizer, audio_kind=audio_kind), rngs=nnx.Rngs(seed))


TEXT = "text"  # a sample kind beside the modalities: no media, no modality token
QUESTIONS = {
    Modality.VISUAL: "What colour is the square?",
    Modality.AUDIO: "How many beeps do you hear?",
    Modality.AUDIO_VISUAL: "the circle moves left and the tone is high?",
    TEXT: "What colour is the square?",
}
ANSWERS = {
    Modality.VISUAL: "red",
    Modality.AUDIO: "three",
    Modality.AUDIO_VISUAL: "the triangle moves up",
    TEXT: "blue",
}


def sample_arrays(tokenizer, kind, rng, image_size=32, *, audio_kind="htsat"):
    """One sample's fields (`kind`: a modality or TEXT); media are random, the prompt follows
    the Vicuna template. The audio arrays are an HTSAT's, or a Whisper encoder's: one 30 s
    log-mel window and a random count of real frames."""
    modality = None if kind == TEXT else Modality(kind)
    question = QUESTIONS[kind] if modality is None else conversation.first_user_message(QUESTIONS[kind], modality)
    ids, labels = conversation.tokenize_turns(
        [(conversation.USER_ROLE, question), (conversation.ASSISTANT_ROLE, ANSWERS[kind])], tokenizer
    )
    if audio_kind == "whisper":
        config = whisper.PRESETS["tiny"]
        audio = dict(
            audio_features=rng.randn(config.num_mel_bins, config.num_frames).astype(np.float32),
            audio_valid_frames=np.full(NUM_SEGMENTS, rng.randint(1, config.max_source_positions + 1), np.int32),
        )
    else:
        audio = dict(
            audio_features=rng.randn(NUM_SEGMENTS, 1, AUDIO_FRAMES, 64).astype(np.float32),
            audio_is_longer=np.zeros(NUM_SEGMENTS, bool),
        )
    return dict(
        input_ids=ids,
        labels=labels,
        frames=rng.randint(0, 256, (NUM_FRAMES, image_size, image_size, 3)).astype(np.uint8),
        **audio,
        has_visual=np.bool_(modality is not None and modality.has_visual),
        has_audio=np.bool_(modality is not None and modality.has_audio),
    )


def collate(samples, length=None):
    """Right-pads the text of samples to one length and stacks everything."""
    length = length or max(len(s["input_ids"]) for s in samples)
    batch = {}
    for key in samples[0]:
        if key in ("input_ids", "labels"):
            fill = 0 if key == "input_ids" else IGNORE_INDEX
            batch[key] = np.stack([np.pad(s[key], (0, length - len(s[key])), constant_values=fill) for s in samples])
        else:
            batch[key] = np.stack([s[key] for s in samples])
    batch["token_mask"] = np.stack([np.arange(length) < len(s["input_ids"]) for s in samples])
    return batch


def mixed_batch(tokenizer, modalities=(*Modality, TEXT), seed=0, pad_to=None, audio_kind="htsat"):
    rng = np.random.RandomState(seed)
    return collate([sample_arrays(tokenizer, m, rng, audio_kind=audio_kind) for m in modalities], pad_to)


def prepared_sample(sample: dict, tokenizer, still: bool = False) -> dict:
    """A `sample_arrays` sample as the pipeline prepares it for packing: unpadded, with its
    frames (one for a still image) and the position of its modality token."""
    frames = sample["frames"][:1] if still else sample["frames"]
    return dict(
        sample,
        frames=frames if sample["has_visual"] else frames[:0],
        modality_token_at=np.int32(conversation.modality_token_position(sample["input_ids"], tokenizer)),
    )


def as_still(sample: dict) -> dict:
    """The sample with a still image: its first frame repeated over the T frames, as the
    unpacked layout holds one."""
    return dict(sample, frames=np.repeat(sample["frames"][:1], NUM_FRAMES, axis=0))


def packed_batch(tokenizer, model_config, kinds, budget, *, seed=0, stills=(), audio_kind="htsat"):
    """`kinds` packed into as many packs as they need (data/packer.py, all in one window), and the
    unpacked samples (stills repeated over T) with their (pack, row, segment id) to compare
    against. Returns (batch, samples, places)."""
    from avllm_jax.data import packer, packing

    rng = np.random.RandomState(seed)
    samples = [sample_arrays(tokenizer, kind, rng, audio_kind=audio_kind) for kind in kinds]
    samples = [as_still(s) if i in stills else s for i, s in enumerate(samples)]
    prepared = [prepared_sample(s, tokenizer, still=i in stills) for i, s in enumerate(samples)]
    rows = packing.ModalityRows(NUM_FRAMES, model_config.vision.num_patches, NUM_SEGMENTS)
    audio_names = ("audio_features", "audio_valid_frames" if audio_kind == "whisper" else "audio_is_longer")
    shapes = dict(
        frame={"frames": (samples[0]["frames"].shape[1:], np.dtype(np.uint8))},
        item={},
        audio={name: (samples[0][name].shape, samples[0][name].dtype) for name in audio_names},
    )
    plan = packer.plan([packing.footprint(s, rows) for s in prepared], budget, window=len(prepared))
    packs, places = [], [None] * len(prepared)
    for index, pack in enumerate(plan):
        packs.append(
            packing.assemble([prepared[i] for i, _, _ in pack], [p[1:] for p in pack], budget, rows, 0, shapes)
        )
        # A sample's segment id is its place among the samples of its row (offsets increase).
        in_row = [0] * budget.rows
        for i, row, _ in pack:
            in_row[row] += 1
            places[i] = (index, row, in_row[row])
    batch = {k: np.stack([p[k] for p in packs]) for k in packs[0]}
    return batch, samples, places
