"""Generation: greedy tokens equal HF `generate` on the same tiny weights; padded and
mixed-modality batch rows equal the rows alone; streaming equals the compiled loop; sampling
filters keep exactly the tokens they should, with the right frequencies."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from avllm_jax.data import conversation
from avllm_jax.data.media import Media
from avllm_jax.inference import generate as gen
from avllm_jax.models import avllm, clip_vision, htsat, llama
from avllm_jax.models import conversion
from hf_reference import TOKENIZER_CORPUS, build_hf
from test_llama import TINY_GQA

MAX_NEW = 16
PROMPT_LENGTHS = (5, 11, 3)


def convert_llama(hf_model, directory):
    """The HF model through the checkpoint conversion path (save, read config, rules, load);
    the target is built abstractly (eager random init costs seconds on a busy CPU)."""
    hf_model.save_pretrained(directory)
    config = llama.LlamaConfig.from_hf(conversion.read_hf_config(directory))
    model = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0)))
    tensors = conversion.iterate_tensors(conversion.checkpoint_files(directory))
    conversion.load_into(model, conversion.convert_tensors(tensors, llama.hf_rules(config), conversion.flat_shapes(nnx.state(model))))
    return model


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
def llama_pair(tmp_path_factory):
    hf_model = build_hf(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY_GQA))
    return hf_model, convert_llama(hf_model, tmp_path_factory.mktemp("llama"))


def padded_prompts(lengths=PROMPT_LENGTHS, width=12, seed=0):
    rng = np.random.RandomState(seed)
    prompts = [rng.randint(3, TINY_GQA["vocab_size"], n) for n in lengths]
    ids, mask = np.zeros((len(prompts), width), np.int32), np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, : p.size], mask[i, : p.size] = p, True
    return prompts, {"input_ids": ids, "token_mask": mask}


def hf_greedy(hf_model, prompt, max_new_tokens, eos_token_id=None, pad_token_id=0):
    """HF's greedy continuation of one unpadded prompt, padded with pad_token_id to max_new_tokens."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(prompt[None]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id)[0, prompt.size:].numpy()
    return np.pad(out, (0, max_new_tokens - out.size), constant_values=pad_token_id)


def test_greedy_padded_batch_equals_hf_generate_per_row(llama_pair):
    hf_model, model = llama_pair
    prompts, batch = padded_prompts()
    out = gen.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=None)
    for i, prompt in enumerate(prompts):
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), hf_greedy(hf_model, prompt, MAX_NEW), err_msg=f"row {i}")
    np.testing.assert_array_equal(np.asarray(out.lengths), [MAX_NEW] * len(prompts))


def test_rows_stop_at_eos_like_hf(llama_pair):
    hf_model, model = llama_pair
    prompts, batch = padded_prompts()
    # EOS: the 4th token of row 0's free continuation, new at that point, so row 0 stops there.
    free = hf_greedy(hf_model, prompts[0], MAX_NEW)
    eos = int(next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i]))
    pad = 1
    out = gen.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=pad)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i, prompt in enumerate(prompts):
        expected = hf_greedy(hf_model, prompt, MAX_NEW, eos_token_id=eos, pad_token_id=pad)
        np.testing.assert_array_equal(tokens[i], expected, err_msg=f"row {i}")
        stops = np.flatnonzero(expected == eos)
        assert lengths[i] == (stops[0] if stops.size else MAX_NEW)
    assert lengths[0] == list(free).index(eos) and (tokens[0, lengths[0] + 1 :] == pad).all()


def test_early_exit_leaves_the_same_tokens(llama_pair):
    """All rows ending early (loop exit) gives what the full-length run gives up to each EOS."""
    _, model = llama_pair
    _, batch = padded_prompts()
    free = np.asarray(gen.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=None).tokens)
    eos = tuple(int(t) for t in free[:, 1])  # every row stops at its second token
    out = gen.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=2)
    for i, row in enumerate(np.asarray(out.tokens)):
        stop = int(out.lengths[i])
        assert stop <= 1
        np.testing.assert_array_equal(row[: stop + 1], free[i, : stop + 1])
        assert (row[stop + 1 :] == 2).all()


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.3, top_k=40, top_p=0.9)], ids=["greedy", "sampled"])
def test_stream_equals_compiled_loop(llama_pair, sampling):
    _, model = llama_pair
    _, batch = padded_prompts()
    row = {k: v[1:2] for k, v in batch.items()}
    rng = jax.random.key(7)
    looped = gen.generate(model, row, max_new_tokens=MAX_NEW, eos_token_id=None, rng=rng, **sampling)
    streamed = list(gen.stream_tokens(model, row, max_new_tokens=MAX_NEW, eos_token_id=None, rng=rng, **sampling))
    assert streamed == np.asarray(looped.tokens[0]).tolist()
    if sampling:
        greedy = gen.generate(model, row, max_new_tokens=MAX_NEW, eos_token_id=None)
        assert streamed != np.asarray(greedy.tokens[0]).tolist()
    # The stream stops before the EOS it meets.
    eos = streamed[5]
    stopped = list(gen.stream_tokens(model, row, max_new_tokens=MAX_NEW, eos_token_id=eos, rng=rng, **sampling))
    assert stopped == streamed[: streamed.index(eos)]


def _frequencies(logits, sampling, draws=4000):
    keys = jax.random.split(jax.random.key(0), draws)
    samples = jax.vmap(lambda k: gen.sample_tokens(logits[None], k, sampling)[0])(keys)
    return np.bincount(np.asarray(samples), minlength=logits.shape[0]) / draws


def test_sampling_filters_and_frequencies():
    probs = np.array([0.05, 0.5, 0.02, 0.3, 0.13])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    assert int(gen.sample_tokens(logits[None], jax.random.key(0), gen.Sampling())[0]) == 1
    # top_k=2: only tokens 1 and 3, renormalised.
    np.testing.assert_allclose(_frequencies(logits, gen.Sampling(1.0, top_k=2)), [0, 0.625, 0, 0.375, 0], atol=0.03)
    # top_p=0.7: token 1 (mass before it 0), token 3 (0.5 < 0.7); token 4 has 0.8 before it.
    freq = _frequencies(logits, gen.Sampling(1.0, top_p=0.7))
    np.testing.assert_allclose(freq, [0, 0.625, 0, 0.375, 0], atol=0.03)
    # temperature 0.5 squares the probabilities before renormalising.
    squared = probs**2 / (probs**2).sum()
    np.testing.assert_allclose(_frequencies(logits, gen.Sampling(0.5)), squared, atol=0.03)
    with pytest.raises(ValueError, match="top_p"):
        gen.Sampling(1.0, top_p=0.0)


def test_empty_prompt_row_is_refused(llama_pair):
    _, model = llama_pair
    _, batch = padded_prompts()
    batch["token_mask"][2] = False
    with pytest.raises(ValueError, match=r"prompt rows \[2\] have no tokens"):
        gen.generate(model, batch, max_new_tokens=2, eos_token_id=None)


# -- the audio-visual model ----------------------------------------------------------------------

SMALL_HTSAT = htsat.HTSATConfig(spec_size=128, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=16, mlp_ratio=2.0)
NUM_FRAMES, NUM_SEGMENTS, AUDIO_SECONDS = 3, 2, 2.0


@pytest.fixture(scope="module")
def tiny_avllm():
    tokenizer = conversation.train_tokenizer(TOKENIZER_CORPUS * 4, vocab_size=300)
    modality_ids = conversation.add_modality_tokens(tokenizer)
    llm_config = dataclasses.replace(llama.PRESETS["tiny"], vocab_size=len(tokenizer))
    config = avllm.AVLLMConfig(clip_vision.PRESETS["tiny"], SMALL_HTSAT, llm_config, tuple(modality_ids))
    model = random_model(config)
    data_config = gen.inference_data_config(model, num_frames=NUM_FRAMES, num_audio_segments=NUM_SEGMENTS,
                                            audio_max_length_s=AUDIO_SECONDS)
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
    assert gen.inference_data_config(nnx.eval_shape(lambda: avllm.AVLLM(fused, rngs=nnx.Rngs(0)))).audio_truncation == "fusion"


def test_mixed_modality_batch_rows_equal_rows_alone(tiny_avllm):
    model, tokenizer, data_config = tiny_avllm
    media = [random_media(0, audio=False), random_media(1, visual=False), random_media(2)]
    # Different lengths within one PROMPT_BUCKET, so the rows alone share one compiled program.
    questions = ["What colour is the square?", "What is the shape, and which way does it move?", "Is the tone high or low?"]
    modalities = [gen.resolve_modality(m, None) for m in media]
    assert modalities == ["visual", "audio", "audio_visual"]
    turns = [[(conversation.USER_ROLE, gen.first_user_message(q, m))] for q, m in zip(questions, modalities)]
    batch = gen.conversation_batch(model, tokenizer, media, turns, modalities, data_config)
    lengths = batch["token_mask"].sum(axis=1)
    assert len(set(lengths.tolist())) == 3  # rows of different prompt lengths
    together = np.asarray(gen.generate(model, batch, max_new_tokens=8, eos_token_id=None).tokens)
    for i in range(3):
        alone = gen.conversation_batch(model, tokenizer, media[i : i + 1], turns[i : i + 1], modalities[i : i + 1], data_config)
        np.testing.assert_array_equal(together[i], np.asarray(gen.generate(model, alone, max_new_tokens=8, eos_token_id=None).tokens[0]))
    assert len({tuple(row) for row in together}) == 3  # the rows are not all alike

    answers = gen.answer_questions(model, tokenizer, media, questions, max_new_tokens=8, data_config=data_config)
    assert answers == [gen.decode_answer(tokenizer, row) for row in together]


def test_forced_modality(tiny_avllm):
    model, tokenizer, data_config = tiny_avllm
    both = random_media(3)
    frames_only = Media(both.frames, None, both.duration_s)
    ask = lambda m, modality: gen.answer_questions(  # noqa: E731
        model, tokenizer, [m], ["What colour is the square?"], modality=modality, max_new_tokens=8, data_config=data_config)
    # Forcing 'visual' on an audio-visual file drops its audio rows: the same answer as no audio at all.
    assert ask(both, ["visual"]) == ask(frames_only, None)
    with pytest.raises(ValueError, match="'audio' needs an audio stream, which media item 0 lacks"):
        ask(frames_only, ["audio"])
