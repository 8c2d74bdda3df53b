"""The composite model and modality-augmented training: mixed batches, dropped rows, zero gradients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import NUM_FRAMES, NUM_SEGMENTS, mixed_batch, packed_batch, tiny_config, tiny_model, tiny_tokenizer

from avllm_jax.data import packing
from avllm_jax.models import avllm, clip_vision, htsat, whisper
from avllm_jax.training import optim, step

MODALITIES = ("visual", "audio", "audio_visual", "text")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


def own_rows(model, sample: dict) -> list[jax.Array]:
    """The sample's modality rows [1, rows, D] by the paper's definition, computed here from the
    encoders and projectors: each frame's CLS through W_t, the patches averaged over the frames
    through W_s, each segment's pooled embedding through W_a."""
    rows = []
    if sample["has_visual"]:
        hidden = model.vision(clip_vision.normalize_frames(jnp.asarray(sample["frames"])))  # [T, 1+N, Dv]
        rows.append(model.temporal_proj(hidden[:, 0])[None])
        rows.append(model.spatial_proj(hidden[:, 1:].mean(axis=0))[None])
    if sample["has_audio"] and model.config.audio.kind == "whisper":
        # Whisper: the clip's window encoded once, its real frames cut into K equal spans.
        hidden = np.asarray(model.audio(jnp.asarray(sample["audio_features"])[None]))[0]
        valid = int(sample["audio_valid_frames"][0])
        bounds = np.linspace(0, valid, NUM_SEGMENTS + 1).astype(int)  # valid is >= K here: no empty span
        pooled = np.stack([hidden[start:end].mean(axis=0) for start, end in zip(bounds[:-1], bounds[1:])])
        rows.append(model.audio_proj(jnp.asarray(pooled))[None])
    elif sample["has_audio"]:
        pooled = model.audio(jnp.asarray(sample["audio_features"]), jnp.asarray(sample["audio_is_longer"]))
        rows.append(model.audio_proj(pooled)[None])
    return rows


def logits_alone(model, sample: dict) -> np.ndarray:
    """One sample, unpadded, with only its own modality's rows, assembled here by hand."""
    ids = sample["input_ids"][sample["token_mask"]] if "token_mask" in sample else sample["input_ids"]
    text = model.llm.embed_tokens(jnp.asarray(ids)[None])
    pieces = [text]
    where = np.flatnonzero(np.isin(ids, list(model.config.modality_token_ids)))
    if where.size:
        p = where[0]
        pieces = [text[:, :p], *own_rows(model, sample), text[:, p + 1 :]]
    return np.asarray(model.llm(inputs_embeds=jnp.concatenate(pieces, axis=1)))[0]


def test_mixed_batch_rows_equal_samples_alone(model, tokenizer):
    batch = mixed_batch(tokenizer, MODALITIES, pad_to=None)
    # Pad further so every sample also has trailing padding.
    batch = {
        k: np.pad(v, [(0, 0), (0, 5)], constant_values=0) if k in ("input_ids", "labels", "token_mask") else v
        for k, v in batch.items()
    }
    logits, inputs = model(jax.tree.map(jnp.asarray, batch))
    kept = np.asarray(inputs["segment_ids"]).astype(bool)
    for i, modality in enumerate(MODALITIES):
        sample = {k: v[i] for k, v in batch.items()}
        alone = logits_alone(model, sample)
        ours = np.asarray(logits)[i][kept[i]]
        assert ours.shape == alone.shape, (modality, ours.shape, alone.shape)
        diff = np.abs(ours - alone).max()
        print(f"MAT {modality}: max|mixed - alone| = {diff:.2e}")
        assert diff <= 1e-5, modality


# Two rows of 480 positions (the tiny tokenizer gives prompts of about 210 tokens), frames for
# two videos and a still, two audio clips: the eight samples below (a still among them) fill
# two packs, two samples to a row.
BUDGET = packing.PackBudget(rows=2, row_length=480, frames=2 * NUM_FRAMES + 1, visual_items=3, audio_clips=2)
PACKED_KINDS = ("visual", "audio", "audio_visual", "text", "visual", "audio_visual", "audio", "text")


def test_packed_batch_samples_equal_samples_alone(model, tokenizer):
    batch, samples, places = packed_batch(tokenizer, model.config, PACKED_KINDS, BUDGET, seed=4, stills=(4,))
    assert batch["input_ids"].shape[0] >= 2 and max(segment for *_, segment in places) >= 2  # packs with shared rows
    logits, inputs = model(jax.tree.map(jnp.asarray, batch))
    logits = np.asarray(logits).reshape(*batch["input_ids"].shape, -1)
    for sample, (pack, row, segment), kind in zip(samples, places, PACKED_KINDS):
        ours = logits[pack, row][batch["segment_ids"][pack, row] == segment]
        alone = logits_alone(model, sample)
        assert ours.shape == alone.shape, (kind, ours.shape, alone.shape)
        diff = np.abs(ours - alone).max()
        print(f"packed MAT {kind}: max|packed - alone| = {diff:.2e}")
        assert diff <= 1e-5, kind
    targets = np.asarray(inputs["targets"]).reshape(batch["input_ids"].shape)
    for sample, (pack, row, segment) in zip(samples, places):
        answer = sample["labels"][sample["labels"] != -100]
        mine = targets[pack, row][batch["segment_ids"][pack, row] == segment]
        np.testing.assert_array_equal(mine[mine != -100], answer)


def test_whisper_model_packed_and_unpacked_equal_samples_alone(tokenizer):
    """The same with a Whisper audio encoder (the paper's Table 6): in a pack and in the
    unpacked layout inference uses, each sample computes what it computes alone."""
    model = tiny_model(tokenizer, audio_kind="whisper")
    kinds = ("audio", "audio_visual", "visual", "audio")
    budget = packing.PackBudget(rows=2, row_length=480, frames=2 * NUM_FRAMES, visual_items=2, audio_clips=3)
    batch, samples, places = packed_batch(tokenizer, model.config, kinds, budget, seed=5, audio_kind="whisper")
    assert batch["audio_features"].shape[1:] == (3, 80, 3000) and batch["audio_valid_frames"].shape[1:] == (
        3,
        NUM_SEGMENTS,
    )
    logits = np.asarray(model(jax.tree.map(jnp.asarray, batch))[0]).reshape(*batch["input_ids"].shape, -1)
    unpacked = mixed_batch(tokenizer, kinds, seed=5, audio_kind="whisper")
    unpacked_logits, inputs = model(jax.tree.map(jnp.asarray, unpacked))
    kept = np.asarray(inputs["segment_ids"]).astype(bool)
    for i, (sample, (pack, row, segment), kind) in enumerate(zip(samples, places, kinds)):
        alone = logits_alone(model, sample)
        for layout, ours in (
            ("packed", logits[pack, row][batch["segment_ids"][pack, row] == segment]),
            ("unpacked", np.asarray(unpacked_logits)[i][kept[i]]),
        ):
            assert ours.shape == alone.shape, (layout, kind)
            diff = np.abs(ours - alone).max()
            print(f"whisper {layout} {kind}: max|batched - alone| = {diff:.2e}")
            assert diff <= 1e-5, (layout, kind)


@pytest.mark.parametrize("kind, module", [("htsat", htsat.HTSAT), ("whisper", whisper.WhisperEncoder)])
def test_the_audio_part_is_either_encoder_and_its_config_says_which(tokenizer, kind, module):
    """One part 'audio', of either kind: its module, its parameters' key and its config.json block
    (with the kind; an audio block written without one, before there were two, is an HTSAT's)."""
    config = tiny_config(tokenizer, audio_kind=kind)
    model = nnx.eval_shape(lambda: avllm.AVLLM(config, rngs=nnx.Rngs(0)))
    assert isinstance(model.audio, module) and model.audio_proj is not None
    assert set(nnx.to_pure_dict(nnx.state(model))) == {
        "vision",
        "audio",
        "llm",
        "temporal_proj",
        "spatial_proj",
        "audio_proj",
    }
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["audio"]["kind"] == kind and set(stored) == {"vision", "audio", "llm", "modality_token_ids"}
    assert avllm.AVLLMConfig.from_dict(stored) == config
    without_kind = stored | {"audio": {k: v for k, v in stored["audio"].items() if k != "kind"}}
    if kind == "htsat":
        assert avllm.AVLLMConfig.from_dict(without_kind) == config
    else:  # read as an HTSAT's, Whisper's fields are unknown
        with pytest.raises(ValueError, match=r"unknown HTSATConfig fields .*'d_model'"):
            avllm.AVLLMConfig.from_dict(without_kind)
    with pytest.raises(ValueError, match="unknown audio encoder kind 'clap': one of htsat, whisper"):
        avllm.AVLLMConfig.from_dict(stored | {"audio": stored["audio"] | {"kind": "clap"}})


def test_targets_are_the_answer_tokens(model, tokenizer):
    batch = mixed_batch(tokenizer, MODALITIES)
    _, inputs = model(jax.tree.map(jnp.asarray, batch))
    targets = np.asarray(inputs["targets"])
    for i in range(len(MODALITIES)):
        answer = batch["labels"][i][batch["labels"][i] != -100]
        np.testing.assert_array_equal(targets[i][targets[i] != -100], answer)
        assert answer[-1] == tokenizer.eos_token_id


def test_each_text_row_targets_the_next_tokens_label(model, tokenizer):
    """Position by position: the target of the row holding text token j is label j+1 (the
    next token); modality rows and dropped rows target nothing. So the row of the ':' of
    "ASSISTANT:" targets the answer's first token."""
    longest = max(len(mixed_batch(tokenizer, (m,))["input_ids"][0]) for m in MODALITIES)
    batch = mixed_batch(tokenizer, MODALITIES, pad_to=longest + 3)  # every row ends in padding
    _, inputs = model(jax.tree.map(jnp.asarray, batch))
    targets, kept = np.asarray(inputs["targets"]), np.asarray(inputs["segment_ids"]) > 0
    for i, modality in enumerate(MODALITIES):
        ids, labels = batch["input_ids"][i][batch["token_mask"][i]], batch["labels"][i][batch["token_mask"][i]]
        next_labels = np.append(labels[1:], -100)
        # The kept rows, in order: the text before the modality token, the sample's own
        # modality rows, the text after the token (which the rows replace).
        where = np.flatnonzero(np.isin(ids, list(model.config.modality_token_ids)))
        own_rows = int(batch["has_visual"][i]) * (NUM_FRAMES + model.config.vision.num_patches)
        own_rows += int(batch["has_audio"][i]) * NUM_SEGMENTS
        p = where[0] if where.size else ids.size
        expected = np.concatenate([next_labels[:p], np.full(own_rows, -100), next_labels[p + 1 :]])
        np.testing.assert_array_equal(targets[i][kept[i]], expected, err_msg=modality)
        assert (targets[i][~kept[i]] == -100).all(), modality

        answer_start = np.flatnonzero(labels != -100)[0]
        colon_row = answer_start - 1 if answer_start - 1 < p else answer_start - 2 + own_rows
        assert tokenizer.decode(ids[answer_start - 1 : answer_start]).strip() == ":"
        assert targets[i][np.flatnonzero(kept[i])[colon_row]] == labels[answer_start] != -100, modality
        assert len(set(labels[labels != -100].tolist())) > 1, "a one-token answer cannot show a shift"


def grads_of_projectors(model, batch):
    graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter([r".*_proj\..*", r"llm\..*"]), ...)

    def loss(params):
        return step.loss_sums(nnx.merge(graphdef, params, frozen), batch)[0]

    return jax.jit(jax.grad(loss))(trainable)


@pytest.mark.parametrize(
    "modality, zero, nonzero",
    [
        ("visual", ["audio_proj"], ["temporal_proj", "spatial_proj"]),
        ("audio", ["temporal_proj", "spatial_proj"], ["audio_proj"]),
    ],
)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_absent_modality_projector_gets_exactly_zero_gradient(model, tokenizer, modality, zero, nonzero, packed):
    kinds = (modality, modality, "text")
    if packed:  # a pack's media slots hold the other modality's zeros too
        batch = packed_batch(tokenizer, model.config, kinds, BUDGET, seed=3)[0]
    else:
        batch = mixed_batch(tokenizer, kinds, seed=3)
    grads = grads_of_projectors(model, jax.tree.map(jnp.asarray, batch))
    for name in zero:
        for leaf in jax.tree.leaves(grads[name]):
            assert np.all(np.asarray(leaf) == 0.0), name
    for name in nonzero:
        assert any(np.abs(np.asarray(leaf)).max() > 0 for leaf in jax.tree.leaves(grads[name])), name


def test_encoders_never_change_and_hold_no_optimizer_state(model, tokenizer):
    import ml_collections

    model = nnx.merge(*nnx.split(model))  # a copy
    trainable_filter = optim.trainable_filter([r".*_proj\..*", r"llm\..*"])
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
    encoders_before = jax.tree.map(np.array, nnx.to_pure_dict(frozen))
    optim_config = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-2,
            warmup_fraction=0.0,
            beta1=0.9,
            beta2=0.98,
            eps=1e-8,
            weight_decay=0.1,
            max_grad_norm=1.0,
            final_learning_rate=0.0,
        )
    )
    optimizer = optim.make_optimizer(optim_config, total_steps=3, params=trainable)
    # The step donates its state: keep `trainable` to compare with.
    state = step.TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, trainable), optimizer.init(trainable))
    train_step = step.make_train_step(graphdef, optimizer, num_microbatches=2)
    batch = jax.tree.map(jnp.asarray, mixed_batch(tokenizer, MODALITIES, seed=1))
    for _ in range(3):
        state, metrics = train_step(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(frozen), encoders_before)
    frozen_names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)}
    assert any(n.startswith("vision.") for n in frozen_names) and any(n.startswith("audio.") for n in frozen_names)
    # Optimizer moments exist for the trainable parameters only.
    trainable_size = sum(x.size for x in jax.tree.leaves(state.params))
    moment_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moment_size == 2 * trainable_size
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainable))]
    assert all(changed)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_gradient_accumulation_equals_one_big_batch(model, tokenizer, packed):
    graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter([r".*_proj\..*", r"llm\..*"]), ...)
    if packed:  # two packs of different answer-token counts: the mean is over the tokens of both
        batch = packed_batch(tokenizer, model.config, PACKED_KINDS, BUDGET, seed=2, stills=(4,))[0]
    else:
        batch = mixed_batch(tokenizer, MODALITIES * 2, seed=2)
    batch = jax.tree.map(jnp.asarray, batch)
    import optax

    results = []
    for microbatches in (1, 2 if packed else 4):
        optimizer = optax.sgd(1.0)
        state = step.TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, trainable), optimizer.init(trainable))
        state, metrics = step.make_train_step(graphdef, optimizer, num_microbatches=microbatches)(state, frozen, batch)
        results.append((state.params, metrics))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-6)
