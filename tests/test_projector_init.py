"""config.projector_init="centred" (avllm_jax/training/projector_init.py): the modality rows the
LLM receives start centred and at the scale of its token embeddings, counted over the rows the
batches use (a slot no sample fills does not count); a bad setting is a config error."""

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import NUM_FRAMES, packed_batch, tiny_model, tiny_tokenizer

from avllm_jax.data import packing
from avllm_jax.training import config as config_lib
from avllm_jax.training import projector_init

# Room for more frames and clips than the samples bring: some slots stay empty.
BUDGET = packing.PackBudget(rows=2, row_length=480, frames=3 * NUM_FRAMES, visual_items=3, audio_clips=3)
KINDS = ("visual", "audio", "audio_visual", "text", "visual", "audio_visual", "audio")
PROJECTORS = ("temporal_proj", "spatial_proj", "audio_proj")


def rows_the_llm_reads(model, batch) -> dict[str, np.ndarray]:
    """Per projector, the LLM's input vectors at the positions its rows fill."""
    inputs = np.asarray(model.embed_inputs(batch)["inputs_embeds"])
    packs = batch["input_ids"].shape[0]
    inputs = inputs.reshape(packs, -1, inputs.shape[-1])
    index = np.asarray(batch["modality_index"]).reshape(packs, -1)
    # The table's layout (data/packing.py): F frame rows, V x N patch rows, A x K audio rows.
    frames = batch["frames"].shape[1]
    patches = BUDGET.visual_items * model.vision.config.num_patches
    bounds = {"temporal_proj": (0, frames), "spatial_proj": (frames, frames + patches)}
    bounds["audio_proj"] = (frames + patches, np.inf)
    return {name: inputs[(index >= low) & (index < high)] for name, (low, high) in bounds.items()}


def all_table_rows(model, batch) -> dict[str, np.ndarray]:
    """Every row of the table, filled or not."""
    return {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in model.projected_rows(batch).items()}


@pytest.fixture(scope="module")
def centred():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batches = [packed_batch(tokenizer, model.config, KINDS, BUDGET, seed=seed)[0] for seed in (1, 2)]
    before = [rows_the_llm_reads(model, b) for b in batches]
    report = projector_init.centre_projectors(model, batches)
    after = [rows_the_llm_reads(model, b) for b in batches]
    joined = lambda found: {k: np.concatenate([f[k] for f in found]) for k in PROJECTORS}
    embeddings = np.asarray(model.language_model.embed[...], np.float64)
    return dict(
        model=model,
        batches=batches,
        before=joined(before),
        after=joined(after),
        report=report,
        word_rms=np.sqrt(np.mean(np.sum(embeddings**2, axis=1))),
    )


def test_the_rows_the_llm_reads_start_centred_at_its_words_scale(centred):
    for name in PROJECTORS:
        before, after = centred["before"][name], centred["after"][name]
        assert len(after) == centred["report"][name]["rows"] > 1, name
        rms = lambda rows: np.sqrt(np.mean(np.sum(rows**2, axis=1)))
        # Far from it at the random start, so the checks below can fail.
        assert np.linalg.norm(before.mean(0)) > 0.5 * rms(before) and abs(rms(before) / centred["word_rms"] - 1) > 0.5
        np.testing.assert_allclose(after.mean(0), 0.0, atol=1e-5 * centred["word_rms"])
        np.testing.assert_allclose(rms(after), centred["word_rms"], rtol=1e-4)
        # Only moved and scaled: each centred row keeps its direction.
        centred_before = before - before.mean(0)
        cosine = np.sum(centred_before * after, axis=1) / np.linalg.norm(centred_before, axis=1)
        np.testing.assert_allclose(cosine / np.linalg.norm(after, axis=1), 1.0, atol=1e-4)


def test_slots_no_sample_fills_are_not_counted(centred):
    model, batches = centred["model"], centred["batches"]
    for name in ("temporal_proj", "audio_proj"):
        every_slot = np.concatenate([all_table_rows(model, b)[name] for b in batches])
        assert len(every_slot) > len(centred["after"][name]), name  # the budget leaves slots empty
        # Counted with the empty slots, the mean would not be the one set.
        assert np.linalg.norm(every_slot.mean(0)) > 0.05 * centred["word_rms"], name


def test_a_projector_init_that_does_not_exist_is_a_config_error():
    config = config_lib.base_config()
    config.projector_init = "centered"
    with pytest.raises(
        config_lib.ConfigError, match=r"projector_init='centered' is not one of \('random', 'centred'\)"
    ):
        config_lib.check_config(config)
    config = config_lib.base_config()
    config.projector_init_batches = 0
    with pytest.raises(config_lib.ConfigError, match="projector_init_batches=0: it must be at least 1"):
        config_lib.check_config(config)


def test_every_row_alike_is_a_clear_error():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batch = packed_batch(tokenizer, model.config, ("audio", "audio"), BUDGET, seed=3)[0]
    model.audio_proj.kernel[...] = jnp.zeros_like(model.audio_proj.kernel[...])  # every row is the bias
    with pytest.raises(ValueError, match="every row of audio_proj is the same"):
        projector_init.centre_projectors(model, [batch])


def test_a_fitted_projector_makes_rows_at_their_targets():
    """projector_init.fit_projector (the demo's stage 1 start): on inputs with a large common part
    (as the random CLIP's class tokens have), the fitted projector's rows are the targets of an
    affine map it can express, and an unrelated target's variance is not explained."""
    from flax import nnx

    from avllm_jax.models import layers

    rng = np.random.default_rng(0)
    inputs = 20.0 + rng.normal(size=(400, 12))  # mean 20, spread 1
    true_kernel, true_bias = rng.normal(size=(12, 6)) * 0.1, rng.normal(size=6)
    targets = inputs @ true_kernel + true_bias
    projector = layers.Dense(12, 6, (None, "embed"), rngs=nnx.Rngs(0))
    explained = projector_init.fit_projector(projector, inputs, targets, ridge=1e-9)
    assert explained > 0.9999
    np.testing.assert_allclose(np.asarray(projector(jnp.asarray(inputs, jnp.float32))), targets, atol=1e-3)
    noise = rng.normal(size=(400, 6))  # nothing in the inputs tells it
    assert projector_init.fit_projector(projector, inputs, noise) < 0.1
