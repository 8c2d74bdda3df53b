"""The decode loop: greedy tokens equal HF `generate` on the same tiny weights, padded rows
included; rows stop at their EOS; streaming equals the compiled loop; sampling filters keep
exactly the tokens they should, with the right frequencies. (Mixed-modality AVLLM batches:
test_prompts.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_reference import build_hf
from test_llama import TINY_GQA

from avllm_jax.inference import generate as gen
from avllm_jax.models import conversion, llama

MAX_NEW = 16
PROMPT_LENGTHS = (5, 11, 3)


def convert_llama(hf_model, directory):
    """The HF model through the checkpoint conversion path (save, read config, rules, load);
    the target is built abstractly (eager random init costs seconds on a busy CPU)."""
    hf_model.save_pretrained(directory)
    config = llama.LlamaConfig.from_hf(conversion.read_hf_config(directory))
    model = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0)))
    tensors = conversion.iterate_tensors(conversion.checkpoint_files(directory))
    conversion.load_into(
        model, conversion.convert_tensors(tensors, llama.hf_rules(config), conversion.flat_shapes(nnx.state(model)))
    )
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
        out = hf_model.generate(
            torch.tensor(prompt[None]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )[0, prompt.size :].numpy()
    return np.pad(out, (0, max_new_tokens - out.size), constant_values=pad_token_id)


def test_greedy_padded_batch_equals_hf_generate_per_row(llama_pair):
    hf_model, model = llama_pair
    prompts, batch = padded_prompts()
    out = gen.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=None)
    for i, prompt in enumerate(prompts):
        np.testing.assert_array_equal(
            np.asarray(out.tokens[i]), hf_greedy(hf_model, prompt, MAX_NEW), err_msg=f"row {i}"
        )
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


def test_decoding_phases_give_the_full_forwards_greedy_tokens(llama_pair):
    """Enough new tokens for three decoding phases (each with a longer cache): every token is the
    argmax of the full forward (no cache) over the prompt and the tokens before it; rows that all
    stop in the second phase keep their tokens up to the EOS, and the third phase adds none."""
    _, model = llama_pair
    prompts, batch = padded_prompts()
    prompt_length, max_new = batch["input_ids"].shape[1], 3 * gen.MIN_PHASE_SLOTS + 6
    last_steps = [w - prompt_length for w in gen._cache_windows(prompt_length, max_new)]
    assert len(last_steps) == 3
    tokens = np.asarray(gen.generate(model, batch, max_new_tokens=max_new, eos_token_id=None).tokens)
    ids, mask = (
        np.zeros((len(prompts), prompt_length + max_new), np.int32),
        np.zeros((len(prompts), prompt_length + max_new), bool),
    )
    for i, p in enumerate(prompts):
        ids[i, : p.size + max_new], mask[i, : p.size + max_new] = np.concatenate([p, tokens[i]]), True
    logits = model(
        jnp.asarray(ids), positions=llama.kept_positions(jnp.asarray(mask)), segment_ids=jnp.asarray(mask, jnp.int32)
    )
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(
            np.argmax(np.asarray(logits[i, p.size - 1 : p.size - 1 + max_new]), -1), tokens[i], err_msg=f"row {i}"
        )
    # Each row's EOS: its first token after the first phase that no row made in the first phase.
    seen = set(tokens[:, : last_steps[0] + 1].ravel())
    eos = tuple(int(next(t for t in row[last_steps[0] + 1 :] if t not in seen)) for row in tokens)
    out = gen.generate(model, batch, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=2)
    for i, row in enumerate(np.asarray(out.tokens)):
        end = int(out.lengths[i])
        assert last_steps[0] < end <= last_steps[1], (end, last_steps)
        np.testing.assert_array_equal(row[: end + 1], tokens[i, : end + 1])
        assert (row[end + 1 :] == 2).all()


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


def test_rows_split_over_devices_give_what_one_device_gives(llama_pair):
    """3 rows over 8 devices (padded to 8 by repeating the last row): the same tokens as on one."""
    _, model = llama_pair
    _, batch = padded_prompts()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    alone = gen.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=None)
    split = gen.generate(gen.replicate(model, mesh), batch, max_new_tokens=MAX_NEW, eos_token_id=None, mesh=mesh)
    assert len(split.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(split.tokens), np.asarray(alone.tokens))
    np.testing.assert_array_equal(np.asarray(split.lengths), np.asarray(alone.lengths))


def test_a_model_laid_out_as_in_training_gives_what_one_device_gives(llama_pair):
    """FSDP over 8 devices (each holding 1/8 of every matrix), the rows split over them too."""
    from avllm_jax.training import sharding

    _, model = llama_pair
    _, batch = padded_prompts()
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    graphdef, state = nnx.split(model)
    laid_out = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh)))
    assert laid_out.layers.q_proj.get_value().sharding.spec[1] == "fsdp"
    alone = gen.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=None)
    split = gen.generate(laid_out, batch, max_new_tokens=MAX_NEW, eos_token_id=None, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(split.tokens), np.asarray(alone.tokens))
    np.testing.assert_array_equal(np.asarray(split.lengths), np.asarray(alone.lengths))
