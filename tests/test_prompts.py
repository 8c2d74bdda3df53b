"""Prompts about media: rows of a padded, mixed-modality AVLLM batch generate what they generate
alone; answer_questions answers what the batch generates; forced modalities and the inference
data config; prompts that cannot be built are refused."""

import dataclasses

import numpy as np
import pytest
from flax import nnx
from hf_reference import TOKENIZER_CORPUS

from avllm_jax.data import conversation
from avllm_jax.data.media import Media
from avllm_jax.inference import generate as gen
from avllm_jax.inference import prompts
from avllm_jax.modality import Modality
from avllm_jax.models import avllm, clip_vision, conversion, htsat, llama

SMALL_HTSAT = htsat.HTSATConfig(
    spec_size=128, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=16, mlp_ratio=2.0
)
NUM_FRAMES, NUM_SEGMENTS, AUDIO_SECONDS = 3, 2, 2.0


def random_model(config: avllm.AVLLMConfig, seed=0) -> avllm.AVLLM:
    """An AVLLM with random numpy weights: norm scales and variances near 1, biases near 0,
    matrices of std 0.2 (strong enough that answers depend on the prompt and the media; with
    std 0.02 every prompt ending in "ASSISTANT:" gets the same answer)."""
    model = nnx.eval_shape(lambda: avllm.AVLLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        name, shape = str(path[-1]), variable.get_value().shape
        noise = rng.standard_normal(shape).astype(np.float32)
        if "bias" in name or name == "mean":
            flat[".".join(map(str, path))] = 0.1 * noise
        elif "norm" in name or "scale" in name or name == "var":
            flat[".".join(map(str, path))] = 1 + 0.1 * np.abs(noise)
        else:
            flat[".".join(map(str, path))] = 0.2 * noise
    conversion.load_into(model, flat)
    return model


@pytest.fixture(scope="module")
def tiny_avllm():
    tokenizer = conversation.train_tokenizer(TOKENIZER_CORPUS * 4, vocab_size=300)
    modality_ids = conversation.add_modality_tokens(tokenizer)
    llm_config = dataclasses.replace(llama.PRESETS["tiny"], vocab_size=len(tokenizer))
    config = avllm.AVLLMConfig(clip_vision.PRESETS["tiny"], SMALL_HTSAT, llm_config, tuple(modality_ids))
    model = random_model(config)
    data_config = prompts.inference_data_config(
        model, num_frames=NUM_FRAMES, num_audio_segments=NUM_SEGMENTS, audio_max_length_s=AUDIO_SECONDS
    )
    return model, tokenizer, data_config


def random_media(seed, visual=True, audio=True):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (NUM_FRAMES, 32, 32, 3), dtype=np.uint8) if visual else None
    sound = (0.3 * rng.standard_normal((NUM_SEGMENTS, 48000))).astype(np.float32) if audio else None
    return Media(frames, sound, 2.0)


def test_inference_data_config_follows_the_encoders(tiny_avllm):
    model, _, config = tiny_avllm
    assert config.image_size == 32 and config.audio_truncation == "rand_trunc"
    fused = dataclasses.replace(model.config, audio=dataclasses.replace(SMALL_HTSAT, enable_fusion=True))
    assert (
        prompts.inference_data_config(nnx.eval_shape(lambda: avllm.AVLLM(fused, rngs=nnx.Rngs(0)))).audio_truncation
        == "fusion"
    )


def test_a_converted_checkpoint_gets_the_longest_audio_window_its_htsat_takes(tiny_avllm):
    """SMALL_HTSAT's 128-pixel image holds 2 x 128 = 256 frames: 255 hops of 10 ms, not CLAP's 10 s."""
    model, _, _ = tiny_avllm
    assert prompts.inference_data_config(model).audio_max_length_s == pytest.approx(2.55)
    with pytest.raises(
        ValueError,
        match=r"audio_max_length_s=2.56 gives 257 spectrogram frames and the audio encoder takes at "
        r"most 256: use a window of 2.55 s or less \(--audio-window-s",
    ):
        prompts.inference_data_config(model, audio_max_length_s=2.56)
    with pytest.raises(
        ValueError, match=r"audio_truncation='fusion' but the audio encoder is unfused; use 'rand_trunc'"
    ):
        prompts.inference_data_config(model, audio_truncation="fusion")


def test_mixed_modality_batch_rows_equal_rows_alone(tiny_avllm):
    model, tokenizer, data_config = tiny_avllm
    media = [random_media(0, audio=False), random_media(1, visual=False), random_media(2)]
    # Different lengths within one PROMPT_BUCKET, so the rows alone share one compiled program.
    questions = [
        "What colour is the square?",
        "What is the shape, and which way does it move?",
        "Is the tone high or low?",
    ]
    modalities = [prompts.resolve_modality(m, None) for m in media]
    assert modalities == [Modality.VISUAL, Modality.AUDIO, Modality.AUDIO_VISUAL]
    turns = [[(conversation.USER_ROLE, conversation.first_user_message(q, m))] for q, m in zip(questions, modalities)]
    batch = prompts.conversation_batch(model, tokenizer, media, turns, modalities, data_config)
    lengths = batch["token_mask"].sum(axis=1)
    assert len(set(lengths.tolist())) == 3  # rows of different prompt lengths
    together = np.asarray(gen.generate(model, batch, max_new_tokens=8, eos_token_id=None).tokens)
    for i in range(3):
        alone = prompts.conversation_batch(
            model, tokenizer, media[i : i + 1], turns[i : i + 1], modalities[i : i + 1], data_config
        )
        np.testing.assert_array_equal(
            together[i], np.asarray(gen.generate(model, alone, max_new_tokens=8, eos_token_id=None).tokens[0])
        )
    assert len({tuple(row) for row in together}) == 3  # the rows are not all alike

    answers = prompts.answer_questions(model, tokenizer, media, questions, max_new_tokens=8, data_config=data_config)
    assert answers == [prompts.decode_answer(tokenizer, row) for row in together]


def test_forced_modality(tiny_avllm):
    model, tokenizer, data_config = tiny_avllm
    both = random_media(3)
    frames_only = Media(both.frames, None, both.duration_s)
    ask = lambda m, modality: prompts.answer_questions(
        model,
        tokenizer,
        [m],
        ["What colour is the square?"],
        modality=modality,
        max_new_tokens=8,
        data_config=data_config,
    )
    # Forcing 'visual' on an audio-visual file drops its audio rows: the same answer as no audio at all.
    assert ask(both, [Modality.VISUAL]) == ask(frames_only, None)
    with pytest.raises(ValueError, match="'audio' needs an audio stream, which media item 0 lacks"):
        ask(frames_only, [Modality.AUDIO])


def test_prompts_that_cannot_be_built_are_refused(tiny_avllm):
    model, tokenizer, data_config = tiny_avllm
    question = [(conversation.USER_ROLE, conversation.first_user_message("What is it?", Modality.VISUAL))]
    answered = question + [(conversation.ASSISTANT_ROLE, "red")]
    batch = lambda media, turns: prompts.conversation_batch(
        model, tokenizer, [media], [turns], [Modality.VISUAL], data_config
    )
    with pytest.raises(ValueError, match="conversation 0 ends with an answer"):
        batch(random_media(4), answered)
    with pytest.raises(ValueError, match="'visual' needs a video stream, which media item 0 lacks"):
        batch(random_media(4, visual=False), question)
    with pytest.raises(ValueError, match="media item 0 has no video or audio stream"):
        prompts.answer_questions(model, tokenizer, [Media(None, None, 0.0)], ["What is it?"], data_config=data_config)
