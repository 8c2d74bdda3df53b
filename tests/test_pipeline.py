"""The grain pipeline: batch layout, determinism, checkpointing, mixing, sharding, bad data."""

import json
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from avllm_jax import runtime
from avllm_jax.data import conversation as conv
from avllm_jax.data import features, pipeline, synthetic
from avllm_jax.data.media import MediaError, write_media
from avllm_jax.modality import IGNORE_INDEX, MODALITY_TOKENS, Modality

SIZE, FRAMES, SEGMENTS, TEXT = 16, 2, 2, 64


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [conv.SYSTEM_PROMPT, "USER: ASSISTANT: what is it? item a dog a tone", *[f"item{i}" for i in range(100)]]
    tokenizer = conv.train_tokenizer(corpus, vocab_size=700)
    conv.add_modality_tokens(tokenizer)
    return tokenizer


def data_config(*sources, **overrides):
    config = pipeline.default_data_config()
    config.sources = [dict(path=str(path), media_root=None, weight=weight) for path, weight in sources]
    config.num_frames, config.image_size, config.num_audio_segments = FRAMES, SIZE, SEGMENTS
    config.audio_max_length_s, config.audio_truncation = 0.25, "rand_trunc"
    config.max_text_length, config.worker_count, config.read_threads = TEXT, 0, 1
    for key, value in overrides.items():
        config[key] = value
    return config


def chat(prompt, answer="a dog", **media):
    return {
        "id": prompt,
        **media,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
    }


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def text_source(path, name, count):
    return write_jsonl(path, [chat(f"{name} item{i}") for i in range(count)])


def prompt_names(batch, tokenizer):
    """The 'name itemN' question of each row, read back from the token ids."""
    names = []
    for ids, mask in zip(batch["input_ids"], batch["token_mask"]):
        text = tokenizer.decode(ids[mask], skip_special_tokens=True)
        names.append(text.split("USER:")[1].split("ASSISTANT:")[0].strip())
    return names


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """Tiny files: an audio-visual clip, a silent clip, an audio-only file, a still and a non-media file."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    frames = synthetic.draw_clip("red", "circle", "left", rng)[:, ::2, ::2]
    tone = synthetic.tone_pattern("high", 2, rng)[:24000]
    write_media(root / "av.mp4", frames=frames, audio=tone, audio_options={"aac_coder": "fast"})
    write_media(root / "silent.mp4", frames=frames)
    write_media(root / "sound.flac", audio=tone, audio_codec="flac")
    write_media(root / "still.png", frames=frames[:1], video_codec="png", pix_fmt="rgb24", container_format="image2")
    (root / "broken.mp4").write_text("not a video")
    return root


def test_batch_layout_and_modality_tokens(tmp_path, tokenizer, media_dir):
    records = [
        chat("<AUD_VIS>\nwhat is it?", video="av.mp4", modality="audio_visual"),
        chat("<VIS>\nwhat is it?", video="silent.mp4", modality="visual"),
        chat("<AUD>\nwhat is it?", audio="sound.flac", modality="audio"),
        chat("<VIS>\nwhat is it?", image="still.png"),
        chat("what is it?"),
        chat("<AUD>\nwhat is it?", video="av.mp4", modality="audio"),
    ]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    config = data_config((path, 1.0), source_epochs=1)
    config.sources[0]["media_root"] = str(media_dir)
    batch = next(pipeline.make_train_iterator(config, tokenizer, global_batch_size=6, process_index=0, process_count=1))

    b, frames_f = 6, features.audio_frames(config)
    expected = {
        "frames": (np.uint8, (b, FRAMES, SIZE, SIZE, 3)),
        "audio_features": (np.float32, (b, SEGMENTS, 1, frames_f, 64)),
        "audio_is_longer": (np.bool_, (b, SEGMENTS)),
        "has_visual": (np.bool_, (b,)),
        "has_audio": (np.bool_, (b,)),
        "input_ids": (np.int32, (b, TEXT)),
        "labels": (np.int32, (b, TEXT)),
        "token_mask": (np.bool_, (b, TEXT)),
        **{k: (np.int32, (b,)) for k in pipeline.COUNTERS},
        "skipped_reasons": (np.str_, (b,)),
    }
    assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == expected
    token_ids = {tokenizer.convert_tokens_to_ids(m.token): (m.has_visual, m.has_audio) for m in Modality}
    seen = set()
    for row in range(b):
        present = [token_ids[i] for i in batch["input_ids"][row][batch["token_mask"][row]] if i in token_ids]
        flags = (bool(batch["has_visual"][row]), bool(batch["has_audio"][row]))
        assert present == ([flags] if any(flags) else []), row
        seen.add(flags)
        # absent streams are zeros; present ones are not
        assert batch["frames"][row].any() == flags[0] and batch["audio_features"][row].any() == flags[1]
        labelled = batch["labels"][row] != IGNORE_INDEX
        assert not (labelled & ~batch["token_mask"][row]).any()
        assert tokenizer.decode(batch["labels"][row][labelled]).strip() == "a dog</s>"
    assert seen == {(True, True), (True, False), (False, True), (False, False)}
    assert batch["num_rerouted"].sum() == 0 and batch["num_skipped_media"].sum() == 0


def test_requests_for_missing_streams_are_rerouted_and_counted(tmp_path, tokenizer, media_dir):
    records = [
        chat("<AUD_VIS>\nitem1", video="silent.mp4", modality="audio_visual"),  # no audio: -> visual
        chat("<VIS>\nitem2", video="sound.flac", modality="visual"),  # no picture: -> audio
        chat("<AUD>\nitem3", video="av.mp4", modality="audio"),  # served as asked
    ]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    config = data_config((path, 1.0), source_epochs=1)
    config.sources[0]["media_root"] = str(media_dir)
    batch = next(pipeline.make_train_iterator(config, tokenizer, global_batch_size=3, process_index=0, process_count=1))
    outcome = {}
    for row, name in enumerate(prompt_names(batch, tokenizer)):
        ids = batch["input_ids"][row][batch["token_mask"][row]]
        tokens = [t for t in MODALITY_TOKENS if tokenizer.convert_tokens_to_ids(t) in ids]
        flags = (bool(batch["has_visual"][row]), bool(batch["has_audio"][row]))
        outcome[name.split()[-1]] = (flags, tokens, int(batch["num_rerouted"][row]))
    assert outcome == {
        "item1": ((True, False), ["<VIS>"], 1),
        "item2": ((False, True), ["<AUD>"], 1),
        "item3": ((False, True), ["<AUD>"], 0),
    }


def test_restored_iterator_yields_the_same_next_batches(tmp_path, tokenizer):
    path = text_source(tmp_path / "a.jsonl", "a", 13)
    config = data_config((path, 1.0))
    iterator = pipeline.make_train_iterator(config, tokenizer, global_batch_size=4, process_index=0, process_count=1)
    for _ in range(3):
        next(iterator)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = [next(iterator) for _ in range(4)]  # crosses the epoch boundary (13 samples)

    fresh = pipeline.make_train_iterator(config, tokenizer, global_batch_size=4, process_index=0, process_count=1)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want in expected:
        got = next(fresh)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_epochs_cover_every_sample_once_reshuffled_by_seed(tmp_path, tokenizer):
    path = text_source(tmp_path / "a.jsonl", "a", 10)

    def epochs(seed):
        config = data_config((path, 1.0), source_epochs=2, shuffle_seed=seed)
        iterator = pipeline.make_train_iterator(
            config, tokenizer, global_batch_size=5, process_index=0, process_count=1
        )
        names = [n for batch in iterator for n in prompt_names(batch, tokenizer)]
        return names[:10], names[10:]

    first, second = epochs(seed=0)
    everything = sorted(f"a item{i}" for i in range(10))
    assert sorted(first) == sorted(second) == everything and first != second
    assert epochs(seed=0) == (first, second) and epochs(seed=5)[0] != first


def test_hosts_read_disjoint_shards(tmp_path, tokenizer):
    path = text_source(tmp_path / "a.jsonl", "a", 12)
    config = data_config((path, 1.0), source_epochs=1)
    shards = []
    for host in range(2):
        iterator = pipeline.make_train_iterator(
            config, tokenizer, global_batch_size=6, process_index=host, process_count=2
        )
        shards.append([n for batch in iterator for n in prompt_names(batch, tokenizer)])
    assert len(shards[0]) == len(shards[1]) == 6 and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(f"a item{i}" for i in range(12))


def test_hosts_batches_side_by_side_are_the_single_process_batch(tmp_path, tokenizer):
    path = text_source(tmp_path / "a.jsonl", "a", 12)
    config = data_config((path, 1.0), source_epochs=1)
    alone = [
        prompt_names(batch, tokenizer) for batch in pipeline.make_train_iterator(config, tokenizer, global_batch_size=6)
    ]
    hosts = [
        [
            prompt_names(batch, tokenizer)
            for batch in pipeline.make_train_iterator(
                config, tokenizer, global_batch_size=6, process_index=host, process_count=3
            )
        ]
        for host in range(3)
    ]
    assert len(alone) == 2 and all(len(batches) == 2 for batches in hosts)
    for step, batch in enumerate(alone):
        assert hosts[0][step] + hosts[1][step] + hosts[2][step] == batch


def test_mixture_proportions_hold(tmp_path, tokenizer):
    a = text_source(tmp_path / "a.jsonl", "a", 7)
    b = text_source(tmp_path / "b.jsonl", "b", 5)
    config = data_config((a, 3.0), (b, 1.0))
    iterator = pipeline.make_train_iterator(config, tokenizer, global_batch_size=8, process_index=0, process_count=1)
    names = [n for _ in range(25) for n in prompt_names(next(iterator), tokenizer)]
    # Tolerance: 0.05 absolute on the share of 200 samples.
    assert abs(np.mean([n.startswith("a ") for n in names]) - 0.75) <= 0.05
    assert {n for n in names if n.startswith("b ")} == {f"b item{i}" for i in range(5)}


def test_bad_files_are_skipped_and_counted(tmp_path, tokenizer, media_dir):
    records = [chat("<VIS>\nwhat is it?", video="silent.mp4")] * 5 + [chat("<VIS>\nwhat is it?", video="broken.mp4")]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    config = data_config((path, 1.0), source_epochs=2, max_bad_fraction=0.5, min_samples_before_bad_check=1)
    config.sources[0]["media_root"] = str(media_dir)
    iterator = pipeline.make_train_iterator(config, tokenizer, global_batch_size=2, process_index=0, process_count=1)
    batches = list(iterator)
    assert len(batches) == 5  # 10 good samples over two epochs, the 2 bad ones dropped
    assert sum(int(b["num_skipped_media"].sum()) for b in batches) == 2
    assert all(b["has_visual"].all() for b in batches)
    assert iterator.get_state()["grain"]["num_bad"] == 2  # the running count of the bad-sample check
    # The reasons travel with the next good sample, naming the line and the file.
    reasons = [line for b in batches for text in b["skipped_reasons"] for line in str(text).splitlines()]
    assert len(reasons) == 2 and all(r.startswith(f"{path}:6: ") and "broken.mp4" in r for r in reasons)


def test_a_file_with_no_stream_left_is_skipped_as_bad_media(tmp_path, tokenizer, media_dir):
    """An audio stream with fewer samples than segments counts as no audio: nothing to re-route to."""
    write_media(media_dir / "blip.flac", audio=np.full(1, 0.1, np.float32), audio_codec="flac")
    records = [chat("<AUD>\nwhat is it?", audio="blip.flac"), chat("<AUD>\nwhat is it?", audio="sound.flac")]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    config = data_config((path, 1.0), source_epochs=1, max_bad_fraction=0.5, min_samples_before_bad_check=2)
    config.sources[0]["media_root"] = str(media_dir)
    batches = list(
        pipeline.make_train_iterator(config, tokenizer, global_batch_size=1, process_index=0, process_count=1)
    )
    assert len(batches) == 1 and batches[0]["has_audio"].all()
    assert sum(int(b["num_skipped_media"].sum()) for b in batches) == 1


def test_bad_fraction_limit_stops_the_job_listing_the_failures(tmp_path, tokenizer, media_dir):
    records = [chat("<VIS>\nwhat is it?", video="silent.mp4"), chat("<VIS>\nwhat is it?", video="broken.mp4")] * 4
    path = write_jsonl(tmp_path / "data.jsonl", records)
    config = data_config((path, 1.0), max_bad_fraction=0.2, min_samples_before_bad_check=6)
    config.sources[0]["media_root"] = str(media_dir)
    iterator = pipeline.make_train_iterator(config, tokenizer, global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(pipeline.DataError, match=r"(?s)could not be used.*broken\.mp4.*cannot open"):
        for _ in range(10):
            next(iterator)


def test_only_failures_stop_the_job_instead_of_spinning(tmp_path, tokenizer, media_dir):
    path = write_jsonl(tmp_path / "data.jsonl", [chat("<VIS>\nwhat is it?", video="broken.mp4")] * 3)
    config = data_config((path, 1.0), min_samples_before_bad_check=5)
    config.sources[0]["media_root"] = str(media_dir)
    iterator = pipeline.make_train_iterator(config, tokenizer, global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(pipeline.DataError, match="5 of 5 samples could not be used"):
        next(iterator)


def test_malformed_lines_fail_or_are_skipped_per_config(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [chat(f"a item{i}") for i in range(9)] + ["{oops"])
    with pytest.raises(conv.MalformedSampleError, match=r"data\.jsonl:10"):
        pipeline.make_train_iterator(
            data_config((path, 1.0)), tokenizer, global_batch_size=2, process_index=0, process_count=1
        )
    config = data_config((path, 1.0), skip_malformed_lines=True, max_bad_fraction=0.2, source_epochs=1)
    iterator = pipeline.make_train_iterator(config, tokenizer, global_batch_size=3, process_index=0, process_count=1)
    assert sum(b["input_ids"].shape[0] for b in iterator) == 9
    with pytest.raises(pipeline.DataError, match="malformed"):
        config.max_bad_fraction = 0.05
        pipeline.make_train_iterator(config, tokenizer, global_batch_size=3, process_index=0, process_count=1)


def test_eval_reader_keeps_file_order(tmp_path, media_dir):
    records = [
        chat("<AUD>\nq1", audio="sound.flac"),
        chat("q2"),
        chat("<VIS>\nq3", video="silent.mp4"),
        chat("<VIS>\nq4", video="broken.mp4"),
    ]
    path = write_jsonl(tmp_path / "eval.jsonl", records)
    config = data_config((path, 1.0))
    reader = pipeline.iterate_eval(path, config, media_root=media_dir)
    (s1, m1), (s2, m2), (s3, m3) = next(reader), next(reader), next(reader)
    assert [s.turns[0][1] for s in (s1, s2, s3)] == ["<AUD>\nq1", "q2", "<VIS>\nq3"]
    assert m1.has_audio and not m1.has_visual and m2 is None and m3.frames.shape == (FRAMES, SIZE, SIZE, 3)
    with pytest.raises(MediaError, match="broken.mp4"):
        next(reader)


def test_worker_processes_restore_to_the_same_next_batches(tmp_path, tokenizer):
    path = text_source(tmp_path / "a.jsonl", "a", 9)
    config = data_config((path, 1.0), worker_count=2)
    iterator = pipeline.make_train_iterator(config, tokenizer, global_batch_size=2, process_index=0, process_count=1)
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["input_ids"] for _ in range(3)]
    iterator.close()
    fresh = pipeline.make_train_iterator(config, tokenizer, global_batch_size=2, process_index=0, process_count=1)
    fresh.set_state(state)
    assert all(np.array_equal(next(fresh)["input_ids"], want) for want in expected)
    fresh.close()


def _worker_process_cpus() -> dict[int, set[frozenset[int]]]:
    """The CPUs each thread of this process's multiprocessing children may use, by child pid."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
            if parent == os.getpid() and b"spawn_main" in command:
                found[int(entry)] = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{entry}/task")}
        except (OSError, IndexError):  # the process ended meanwhile
            continue
    return found


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and 2 CPUs"
)
def test_dedicated_worker_cpus_keep_decoding_and_training_apart(tmp_path, tokenizer):
    path = text_source(tmp_path / "a.jsonl", "a", 9)
    config = data_config((path, 1.0), worker_count=1, dedicated_worker_cpus=1)
    available = sorted(os.sched_getaffinity(0))
    training, workers = runtime.split_cpus(config)
    assert training == set(available[:-1]) and workers == {available[-1]}
    with runtime.pinned_to(training):
        this_process = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
        iterator = pipeline.make_train_iterator(
            config, tokenizer, global_batch_size=2, process_index=0, process_count=1, worker_cpus=workers
        )
        next(iterator)
        children = _worker_process_cpus()
        iterator.close()
    assert this_process == {frozenset(training)}
    # The workers start with the trainer's CPUs and must have moved to their own.
    assert children and all(threads == {frozenset(workers)} for threads in children.values())
    assert os.sched_getaffinity(0) == set(available)


def test_dedicated_worker_cpus_must_leave_training_a_cpu(tmp_path):
    with pytest.raises(ValueError, match="leaves none"):
        runtime.split_cpus(
            data_config((tmp_path, 1.0), worker_count=1, dedicated_worker_cpus=len(os.sched_getaffinity(0)))
        )
    assert runtime.split_cpus(data_config((tmp_path, 1.0), worker_count=1)) == (None, None)
    assert runtime.split_cpus(data_config((tmp_path, 1.0), worker_count=0, dedicated_worker_cpus=1)) == (None, None)


def test_whisper_front_end_decodes_at_16khz(tmp_path, tokenizer, media_dir):
    """With audio_front_end='whisper' the pipeline resamples to 16 kHz and gives each sample
    Whisper's 30 s log-mel window and its count of real encoder frames (20 ms each)."""
    records = [
        chat("<AUD>\nwhat is it?", audio="sound.flac", modality="audio"),
        chat("<AUD_VIS>\nwhat is it?", video="av.mp4", modality="audio_visual"),
        chat("<VIS>\nwhat is it?", video="silent.mp4", modality="visual"),
    ]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    config = data_config(
        (path, 1.0), source_epochs=1, audio_front_end="whisper", audio_sample_rate=16000, whisper_mel_bins=80
    )
    config.sources[0]["media_root"] = str(media_dir)
    batch = next(pipeline.make_train_iterator(config, tokenizer, global_batch_size=3, process_index=0, process_count=1))
    assert batch["audio_features"].shape == (3, 80, 3000) and batch["audio_valid_frames"].shape == (3, SEGMENTS)
    assert "audio_is_longer" not in batch
    for row in range(3):
        valid = batch["audio_valid_frames"][row]
        assert (valid == valid[0]).all()  # one count, repeated over the K segments
        if batch["has_audio"][row]:
            # 0.5 s of sound: 25 frames of 20 ms (75 had it stayed at 48 kHz); AAC's priming adds at most 2
            assert 25 <= valid[0] <= 27, valid
            # silence after its 50 mel frames (10 ms each): the floor of the log-mel
            assert (batch["audio_features"][row][:, 60:] == batch["audio_features"][row].min()).all()
        else:
            assert valid[0] == 0 and not batch["audio_features"][row].any()
    assert batch["has_audio"].sum() == 2
