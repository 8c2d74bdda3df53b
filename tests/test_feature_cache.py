"""The frozen-encoder feature cache: what it stores, training and evaluation from it, its
fingerprint, shards and resume (avllm_jax/cache_features.py, data/feature_cache.py)."""

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tiny_models import tiny_config, tiny_tokenizer

from avllm_jax import cache_features, train
from avllm_jax.data import conversation, feature_cache, packing, pipeline, samples
from avllm_jax.data.media import write_media
from avllm_jax.models import clip_vision, htsat, whisper
from avllm_jax.training import config as config_lib
from avllm_jax.training import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_SHARDS = 2
# Every cache build here encodes 3 files at a time, so they all run one compiled encoder program.
BUILD_BATCH = 3


def moving_square(colour, frames=12, size=64):
    video = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        video[t, 20:40, 3 * t : 3 * t + 20] = colour
    return video


def beeps(seconds=1.5, rate=48000, pitch=880.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * pitch * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)


def chat(question, answer, **media):
    return {
        "id": question,
        **media,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Five files (one broken), samples that share some of them, a tokenizer, the demo config
    made tiny, and its cache in two shards (float32, so that it can be compared exactly)."""
    root = tmp_path_factory.mktemp("cache")
    fast_aac = {"aac_coder": "fast"}
    write_media(root / "av.mp4", frames=moving_square((255, 0, 0)), audio=beeps(), audio_options=fast_aac)
    write_media(root / "silent.mp4", frames=moving_square((0, 255, 0)))
    write_media(root / "sound.flac", audio=beeps(pitch=330.0), audio_codec="flac")
    write_media(
        root / "still.png",
        frames=moving_square((0, 0, 255))[:1],
        video_codec="png",
        pix_fmt="rgb24",
        container_format="image2",
    )
    (root / "broken.mp4").write_text("not a video")
    records = [
        chat("<AUD_VIS>\nWhat is shown and heard?", "red beeps", video="av.mp4", modality="audio_visual"),
        chat("<VIS>\nWhat colour?", "red", video="av.mp4", modality="visual"),
        chat("<AUD_VIS>\nWhat is heard?", "green", video="silent.mp4", modality="audio_visual"),  # re-routed to visual
        chat("<AUD>\nHow many beeps?", "three", audio="sound.flac", modality="audio"),
        chat("<VIS>\nWhat colour?", "blue", image="still.png"),
        chat("<VIS>\nWhat colour?", "none", video="broken.mp4", modality="visual"),
        chat("Say hello.", "hello"),
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 3))
    tokenizer = conversation.train_tokenizer(
        [conversation.SYSTEM_PROMPT, *[json.dumps(r) for r in records]], vocab_size=600
    )
    tokenizer.save_pretrained(root / "tokenizer")

    config = config_lib.load_config_file(str(REPO / "configs/demo.py"))
    config.tokenizer = str(root / "tokenizer")
    config.data.sources = (dict(path=str(root / "train.jsonl"), media_root=None, weight=1.0),)
    config.model.llm.update(dict(hidden_size=32, intermediate_size=64, head_dim=8))
    config.data.update(
        dict(worker_count=0, dedicated_worker_cpus=0, max_bad_fraction=0.5, min_samples_before_bad_check=1)
    )
    config.data.packing.update(dict(rows=1, row_length=112, frames=8, visual_items=2, audio_clips=2))
    config.update(dict(global_batch_size=8, num_steps=2, log_every=1, checkpoint_every=2))  # 8: the test devices

    cache_dir = root / "features"
    counts = [
        cache_features.build(
            config, str(cache_dir), (i, NUM_SHARDS), batch_size=BUILD_BATCH, dtype="float32", workers=0
        )
        for i in range(NUM_SHARDS)
    ]
    model_config, tokenizer, _ = train.resolve_model(config)  # with the modality tokens
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model = sharding.create_sharded_model(model_config, None, mesh, config.init_seed)
    return dict(root=root, config=config, cache_dir=cache_dir, counts=counts, model=model, tokenizer=tokenizer)


def with_cache(config, cache_dir):
    config = config.copy_and_resolve_references()
    config.data.feature_cache = str(cache_dir)
    return config


def test_cache_holds_each_files_encoder_outputs(setup):
    root, config, model = setup["root"], setup["config"], setup["model"]
    assert [c["files"] for c in setup["counts"]] == [2, 3]  # five files, each once, over two shards
    assert sum(c["skipped"] for c in setup["counts"]) == 1
    cache = feature_cache.FeatureCache(setup["cache_dir"])
    assert set(cache.index) == {str(root / name) for name in ("av.mp4", "silent.mp4", "sound.flac", "still.png")}
    assert (
        list(cache.skipped) == [str(root / "broken.mp4")]
        and "broken.mp4" in (setup["cache_dir"] / "skipped.txt").read_text()
    )
    for name in ("av.mp4", "silent.mp4", "sound.flac", "still.png"):
        cached = cache.lookup(root / name)
        media = samples.load_file_media(root / name, config.data)
        assert (cached.has_visual, cached.has_audio) == (media.has_visual, media.has_audio)
        expected_arrays = {"frame_cls", "item_patches"} if media.has_visual else set()
        assert set(cached.arrays) == expected_arrays | ({"audio_embeddings"} if media.has_audio else set())
        arrays = samples.media_arrays(media, config.data, rng=np.random.default_rng(0))
        if media.has_visual:
            # The vision tower alone, on this file's frames: CLS per frame, patches averaged over them.
            hidden = np.asarray(model.vision(clip_vision.normalize_frames(jnp.asarray(arrays["frames"]))))
            expected_cls = hidden[:1, 0] if media.is_still else hidden[:, 0]
            np.testing.assert_allclose(cached.arrays["frame_cls"], expected_cls, atol=1e-5 * np.abs(hidden).max())
            np.testing.assert_allclose(
                cached.arrays["item_patches"], hidden[:, 1:].mean(0), atol=1e-5 * np.abs(hidden).max()
            )
        if media.has_audio:
            expected = np.asarray(
                model.audio(jnp.asarray(arrays["audio_features"]), jnp.asarray(arrays["audio_is_longer"]))
            )
            np.testing.assert_allclose(cached.arrays["audio_embeddings"], expected, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(pipeline.MediaError, match="broken.mp4.*found when the feature cache was built"):
        cache.lookup(root / "broken.mp4")


def test_packed_batches_from_the_cache_are_the_media_paths(setup):
    """Same samples, order, packs and counters; the features in place of the media."""
    config, tokenizer, model = setup["config"], setup["tokenizer"], setup["model"]
    rows = packing.ModalityRows.of(model.config, config.data)

    def batches(data_config):
        iterator = pipeline.make_train_iterator(
            data_config, tokenizer, global_batch_size=2, process_index=0, process_count=1, modality_rows=rows
        )
        return [next(iterator) for _ in range(5)]

    from_media, from_cache = batches(config.data), batches(with_cache(config, setup["cache_dir"]).data)
    media_keys = {"frames", "audio_features", "audio_is_longer"}
    cached_keys = {"frame_cls", "item_patches", "audio_embeddings"}
    for media_batch, cached_batch in zip(from_media, from_cache):
        assert set(media_batch) - media_keys == set(cached_batch) - cached_keys
        for key in set(media_batch) - media_keys - {"skipped_reasons"}:
            np.testing.assert_array_equal(media_batch[key], cached_batch[key], err_msg=key)
        # The cached CLS tokens sit in the frame slots the frames fill.
        assert (
            (np.abs(cached_batch["frame_cls"]).sum(-1) > 0) == (media_batch["frames"].reshape(2, 8, -1).any(-1))
        ).all()
    assert (
        sum(int(b["num_skipped_media"].sum()) for b in from_cache)
        == sum(int(b["num_skipped_media"].sum()) for b in from_media)
        > 0
    )
    assert sum(int(b["num_rerouted"].sum()) for b in from_cache) > 0


def test_training_from_the_cache_has_the_media_paths_loss(setup, tmp_path):
    """Step 1's loss, trained from the cache, is the model's loss on the media path's first batch."""
    from flax import nnx

    from avllm_jax.training import step

    config, model = setup["config"], setup["model"]
    iterator = pipeline.make_train_iterator(
        config.data,
        setup["tokenizer"],
        global_batch_size=config.global_batch_size,
        process_index=0,
        process_count=1,
        modality_rows=packing.ModalityRows.of(model.config, config.data),
    )
    batch = {k: v for k, v in next(iterator).items() if k not in (*pipeline.COUNTERS, "skipped_reasons")}
    loss_sum, aux = nnx.jit(step.loss_sums)(model, batch)
    config = with_cache(config, setup["cache_dir"])
    config.num_steps = 1
    from_cache = train.train(config, str(tmp_path / "run"))
    assert from_cache["loss"] == pytest.approx(float(loss_sum / aux["target_tokens"]), rel=1e-5)


def test_training_refuses_a_cache_of_other_settings(setup, tmp_path):
    config = with_cache(setup["config"], setup["cache_dir"])
    config.data.audio_padding = "pad"  # refused before any weights load
    with pytest.raises(train.SetupError, match=r"other settings: data.audio_padding \(cache 'repeatpad', run 'pad'\)"):
        train.train(config, str(tmp_path / "run"))
    config = with_cache(setup["config"], setup["cache_dir"])
    config.init_seed = 1  # other random encoders
    with pytest.raises(
        train.SetupError, match=r"other settings: weights.audio \(cache '[0-9a-f]+', run '[0-9a-f]+'\), weights.vision"
    ):
        train.train(config, str(tmp_path / "run"))


def test_training_refuses_a_cache_without_the_sources_files(setup, tmp_path):
    extra = tmp_path / "more.jsonl"
    write_media(tmp_path / "new.mp4", frames=moving_square((255, 255, 0)))
    extra.write_text(json.dumps(chat("<VIS>\nWhat colour?", "yellow", video="new.mp4", modality="visual")) + "\n")
    config = with_cache(setup["config"], setup["cache_dir"])
    config.data.sources = (*config.data.sources, dict(path=str(extra), media_root=None, weight=1.0))
    with pytest.raises(train.SetupError, match=r"1 media files .* not in the feature cache .*new\.mp4"):
        train.train(config, str(tmp_path / "run"))


def test_finished_shards_are_kept_and_an_interrupted_one_is_built_again(setup, tmp_path):
    cache_dir = tmp_path / "features"
    shutil.copytree(setup["cache_dir"], cache_dir)
    first, second = (feature_cache.shard_name(i, NUM_SHARDS) for i in range(NUM_SHARDS))
    # Shard 1 interrupted: its records half written, no index.
    os.replace(cache_dir / f"{second}.array_record", cache_dir / f"{second}.array_record.partial")
    os.remove(cache_dir / f"{second}.json")
    with pytest.raises(feature_cache.FeatureCacheError, match=f"1 of 2 shards are not finished \\({second}"):
        feature_cache.FeatureCache(cache_dir)
    kept = (cache_dir / f"{first}.array_record").stat().st_mtime_ns
    config = setup["config"]
    assert (
        cache_features.build(
            config, str(cache_dir), (0, NUM_SHARDS), batch_size=BUILD_BATCH, dtype="float32", workers=0
        )["files"]
        == 0
    )
    assert (cache_dir / f"{first}.array_record").stat().st_mtime_ns == kept
    assert (
        cache_features.build(
            config, str(cache_dir), (1, NUM_SHARDS), batch_size=BUILD_BATCH, dtype="float32", workers=0
        )["files"]
        == 3
    )
    rebuilt, original = feature_cache.FeatureCache(cache_dir), feature_cache.FeatureCache(setup["cache_dir"])
    assert rebuilt.index == original.index and not (cache_dir / f"{second}.array_record.partial").exists()
    for path in original.index:
        for name, array in original.lookup(path).arrays.items():  # as before, up to XLA's float32 reduction order
            np.testing.assert_allclose(rebuilt.lookup(path).arrays[name], array, atol=1e-6 * np.abs(array).max())
    # A build of other settings into the same directory is refused.
    with pytest.raises(cache_features.CacheBuildError, match="dtype='float32', not 'bfloat16'"):
        os.remove(cache_dir / f"{second}.json")
        cache_features.build(config, str(cache_dir), (1, NUM_SHARDS), dtype="bfloat16", workers=0)


def test_an_htsat_models_fingerprint_is_as_before_the_audio_part_had_kinds():
    """Its fields as model.audio.<field>, without a kind, and its weights' digest as weights.audio,
    as before a Whisper encoder became the part 'audio': its caches stay valid. A Whisper model's
    are under model.audio too (its fields, and the data's front end, tell the kinds apart)."""
    tokenizer = tiny_tokenizer()
    data = pipeline.default_data_config()
    for kind, config_class in (("htsat", htsat.HTSATConfig), ("whisper", whisper.WhisperEncoderConfig)):
        configs = tiny_config(tokenizer, audio_kind=kind).encoder_configs()
        printed = feature_cache.fingerprint(data, configs, {"audio": "digest"})
        audio = {name.removeprefix("model.audio.") for name in printed if name.startswith("model.audio.")}
        assert audio == {field.name for field in dataclasses.fields(config_class)}
        assert printed["weights.audio"] == "digest" and not any(name.startswith("model.whisper") for name in printed)


def test_records_keep_bfloat16_features_and_the_streams():
    arrays = {
        "frame_cls": np.arange(6, dtype=np.float32).reshape(3, 2).astype(ml_dtypes.bfloat16),
        "audio_embeddings": np.array([[0.1, -2.5]], ml_dtypes.bfloat16),
    }
    record = feature_cache.decode_record(feature_cache.encode_record("a/b.mp4", True, True, arrays))
    assert (record.path, record.has_visual, record.has_audio) == ("a/b.mp4", True, True)
    for name, array in arrays.items():
        assert record.arrays[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(record.arrays[name], array)


def test_evaluation_answers_from_cached_features_as_from_the_files(setup):
    from avllm_jax.inference import prompts

    root, model, tokenizer = setup["root"], setup["model"], setup["tokenizer"]
    settings = {
        k: setup["config"].data[k]
        for k in ("num_frames", "image_size", "num_audio_segments", "audio_max_length_s", "audio_truncation")
    }
    data_config = prompts.inference_data_config(model, None, **settings)
    cached_config = prompts.inference_data_config(model, None, **settings, feature_cache=str(setup["cache_dir"]))
    cache = prompts.open_feature_cache(model, cached_config)
    names = ["av.mp4", "silent.mp4", "sound.flac", "still.png"]
    decoded = [samples.load_sample_media(root / name, data_config, None) for name in names]
    cached = [samples.load_sample_media(root / name, cached_config, cache) for name in names]
    questions = ["What is shown?"] * len(names)

    # The unpacked prompt batch's logits, then greedy answers, from either.
    def logits(media, config):
        modalities = [prompts.resolve_modality(m, None) for m in media]
        turns = [
            [(conversation.USER_ROLE, conversation.first_user_message(q, m))] for q, m in zip(questions, modalities)
        ]
        batch = prompts.conversation_batch(model, tokenizer, media, turns, modalities, config)
        return model(jax.tree.map(jnp.asarray, batch))[0]

    media_logits = logits(decoded, data_config)
    np.testing.assert_allclose(
        logits(cached, cached_config), media_logits, atol=1e-5 * float(jnp.abs(media_logits).max())
    )

    def answer(media, config):
        return prompts.answer_questions(model, tokenizer, media, questions, max_new_tokens=4, data_config=config)

    assert answer(cached, cached_config) == answer(decoded, data_config)
    # A cache of other media settings is refused, naming the field.
    with pytest.raises(feature_cache.FeatureCacheError, match="data.num_frames"):
        prompts.open_feature_cache(
            model,
            prompts.inference_data_config(
                model, None, **settings | dict(num_frames=8), feature_cache=str(setup["cache_dir"])
            ),
        )


def test_bad_build_requests_are_clear_errors(setup, tmp_path, monkeypatch):
    for text, message in (("3/2", "I must be in 0 .. N-1"), ("1-4", "expected I/N")):
        with pytest.raises(cache_features.CacheBuildError, match=message):
            cache_features.parse_shard(text)
    monkeypatch.setenv("AVLLM_NUM_PROCESSES", "4")
    monkeypatch.setenv("AVLLM_PROCESS_ID", "2")
    assert cache_features.parse_shard(None) == (2, 4)  # a multi-process job's process takes its own shard
    config = setup["config"].copy_and_resolve_references()
    config.data.sources = (dict(path=str(tmp_path / "none.jsonl"), media_root=None, weight=1.0),)
    with pytest.raises(cache_features.CacheBuildError, match="none.jsonl"):
        cache_features.build(config, str(tmp_path / "features"), (0, 1))
    with pytest.raises(cache_features.CacheBuildError, match="not from another cache"):
        cache_features.build(with_cache(setup["config"], setup["cache_dir"]), str(tmp_path / "features"), (0, 1))
