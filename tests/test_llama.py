"""LLaMA/Vicuna decoder against transformers' LlamaForCausalLM on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import assert_parity, build_hf, convert_saved

from avllm_jax.models import conversion, llama


def convert_llama(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    config = llama.LlamaConfig.from_hf(conversion.read_hf_config(tmp_path))
    return convert_saved(tmp_path, llama.Llama, config, llama.hf_rules(config))


TINY_GQA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny GQA untied", dict(TINY_GQA, tie_word_embeddings=False)),
        ("tiny tied", dict(TINY_GQA, num_key_value_heads=4, tie_word_embeddings=True)),
        (
            "tiny llama3 rope scaling",
            dict(
                TINY_GQA,
                rope_theta=500000.0,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                ),
            ),
        ),
        ("tiny linear rope scaling", dict(TINY_GQA, rope_scaling=dict(rope_type="linear", factor=2.0))),
    ],
)
def test_logits_match_hf_tiny(tmp_path, name, overrides):
    hf_model = build_hf(transformers.LlamaForCausalLM, transformers.LlamaConfig(**overrides))
    model = convert_llama(hf_model, tmp_path)
    ids = np.random.RandomState(0).randint(0, overrides["vocab_size"], (2, 48))
    with torch.no_grad():
        reference = hf_model(torch.tensor(ids)).logits.numpy()
    assert_parity(model(jnp.asarray(ids)), reference, f"llama {name} logits")


def test_logits_match_hf_vicuna_7b_width(tmp_path):
    # Vicuna-7B layer width (4096, 32 heads, 11008 MLP); a small vocabulary keeps the test fast.
    config = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
    )
    hf_model = build_hf(transformers.LlamaForCausalLM, config)
    model = convert_llama(hf_model, tmp_path)
    ids = np.random.RandomState(0).randint(0, 1024, (1, 16))
    with torch.no_grad():
        reference = hf_model(torch.tensor(ids)).logits.numpy()
    del hf_model
    assert_parity(model(jnp.asarray(ids)), reference, "llama vicuna-7b width, 1 layer logits")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    hf_model = build_hf(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY_GQA))
    return hf_model, convert_llama(hf_model, tmp_path_factory.mktemp("tiny"))


def test_cached_logits_equal_full_forward(tiny_pair):
    _, model = tiny_pair
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 24)))
    full = model(ids)
    cache = llama.KVCache.create(model.config, batch_size=2, max_length=32)
    prefill, cache = model(ids[:, :17], cache=cache)
    steps = [prefill]
    for i in range(17, 24):
        step, cache = model(ids[:, i : i + 1], cache=cache)
        steps.append(step)
    cached = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5, rtol=0)
    assert int(cache.length) == 24


def test_greedy_decoding_matches_hf_generate(tiny_pair):
    hf_model, model = tiny_pair
    prompt = np.random.RandomState(2).randint(0, 256, (1, 9))
    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor(prompt), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 9:].numpy()
    cache = llama.KVCache.create(model.config, batch_size=1, max_length=29)
    logits, cache = model(jnp.asarray(prompt), cache=cache)
    tokens = []
    for _ in range(20):
        token = jnp.argmax(logits[:, -1], axis=-1)
        tokens.append(int(token[0]))
        logits, cache = model(token[:, None], cache=cache)
    assert tokens == expected.tolist()


def test_inputs_embeds_equal_token_ids(tiny_pair):
    _, model = tiny_pair
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 256, (2, 10)))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(inputs_embeds=model.embed_tokens(ids))))


def test_segment_zero_rows_do_not_change_real_tokens(tiny_pair):
    """Rows with segment id 0 (padding, absent modality) left out of positions change nothing."""
    _, model = tiny_pair
    ids = jnp.asarray(np.random.RandomState(4).randint(0, 256, (1, 12)))
    alone = model(ids)
    # Insert 5 junk rows after token 4, dropped from attention and from the position count.
    junk = jnp.asarray(np.random.RandomState(5).randint(0, 256, (1, 5)))
    padded = jnp.concatenate([ids[:, :4], junk, ids[:, 4:]], axis=1)
    keep = jnp.asarray([[1] * 4 + [0] * 5 + [1] * 8])
    positions = jnp.maximum(jnp.cumsum(keep, axis=1) - 1, 0)
    out = model(padded, positions=positions, segment_ids=keep)
    kept = np.asarray(keep[0]).astype(bool)
    np.testing.assert_allclose(np.asarray(out)[:, kept], np.asarray(alone), atol=1e-5, rtol=0)


def test_config_from_hf_overrides_win():
    hf = transformers.LlamaConfig(**TINY_GQA).to_dict()
    config = llama.LlamaConfig.from_hf(hf, vocab_size=259, param_dtype="bfloat16")
    assert (config.vocab_size, config.hidden_size, config.param_dtype) == (259, 64, "bfloat16")
    with pytest.raises(TypeError, match="LlamaConfig has no field.*num_hidden_layers"):
        llama.LlamaConfig.from_hf(hf, num_hidden_layers=1)
