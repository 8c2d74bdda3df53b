"""Packing in the pipeline: pack layout, encoder slots, truncation, resume, host shards, budgets.

The model side (a packed sample computes what it computes alone, zero gradients, accumulation)
is in test_avllm.py."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import test_pipeline
from test_pipeline import FRAMES, SEGMENTS, chat, data_config, text_source, write_jsonl

from avllm_jax.data import packer, packing, pipeline
from avllm_jax.modality import IGNORE_INDEX, LOSS_GROUPS

tokenizer, media_dir = test_pipeline.tokenizer, test_pipeline.media_dir  # the fixtures, shared

SPATIAL = 4  # N: the patches of a 2x2-patch ViT
ROWS = packing.ModalityRows(temporal=FRAMES, spatial=SPATIAL, audio=SEGMENTS)


def packed_config(*sources, source_epochs=None, **packing_fields):
    config = data_config(*sources, source_epochs=source_epochs)
    config.packing.update(
        dict(enabled=True, rows=2, row_length=96, frames=2 * FRAMES + 1, visual_items=3, audio_clips=2) | packing_fields
    )
    return config


def iterator(config, tokenizer, packs=1, **kwargs):
    kwargs = dict(process_index=0, process_count=1) | kwargs
    return pipeline.make_train_iterator(config, tokenizer, global_batch_size=packs, modality_rows=ROWS, **kwargs)


def samples_of(batch, tokenizer):
    """Per sample, in pack order: (pack, row, its positions' slice of every [P, R, L] array)."""
    found = []
    for pack in range(batch["input_ids"].shape[0]):
        for row in range(batch["input_ids"].shape[1]):
            segments = batch["segment_ids"][pack, row]
            for segment in range(1, segments.max() + 1):
                where = segments == segment
                fields = {
                    k: batch[k][pack, row][where]
                    for k in ("input_ids", "modality_index", "positions", "targets", "loss_group")
                }
                text = tokenizer.decode(fields["input_ids"][fields["modality_index"] < 0], skip_special_tokens=True)
                found.append(dict(fields, pack=pack, name=text.split("USER:")[1].split("ASSISTANT:")[0].strip()))
    return found


def test_pack_layout_slots_and_routing(tmp_path, tokenizer, media_dir):
    records = [
        chat("<AUD_VIS>\nitem1", video="av.mp4", modality="audio_visual"),
        chat("<VIS>\nitem2", image="still.png"),
        chat("<AUD>\nitem3", audio="sound.flac", modality="audio"),
        chat("item4"),
        chat("<AUD_VIS>\nitem5", video="silent.mp4", modality="audio_visual"),  # no audio: visual, no audio slot
        chat("<VIS>\nitem6", video="silent.mp4", modality="visual"),
    ]
    config = packed_config((write_jsonl(tmp_path / "d.jsonl", records), 1.0), source_epochs=1)
    config.sources[0]["media_root"] = str(media_dir)
    batches = list(iterator(config, tokenizer))
    table = {}
    for batch in batches:
        for sample in samples_of(batch, tokenizer):
            table[sample["name"]] = sample
        # Each pack's frames: videos take FRAMES slots, the still one; its items say so.
        for pack in range(batch["frames"].shape[0]):
            items = batch["item_frames"][pack]
            used = batch["frame_item"][pack] >= 0
            assert (
                used.sum() == items.sum()
                and (batch["frames"][pack][~used] == 0).all()
                and batch["frames"][pack][used].any()
            )
    assert sorted(table) == [f"item{i}" for i in range(1, 7)]
    assert sum(int(b["work"][:, 0].sum()) for b in batches) == 6  # WORK's first entry counts samples
    assert sum(int(b["num_rerouted"].sum()) for b in batches) == 1
    f, v = config.packing.frames, config.packing.visual_items
    audio_start = f + v * SPATIAL
    for name, modality, visual_rows, audio_rows in [
        ("item1", "audio_visual", FRAMES + SPATIAL, SEGMENTS),
        ("item2", "visual", FRAMES + SPATIAL, 0),
        ("item3", "audio", 0, SEGMENTS),
        ("item4", "text", 0, 0),
        ("item5", "visual", FRAMES + SPATIAL, 0),
    ]:
        sample = table[name]
        index = sample["modality_index"][sample["modality_index"] >= 0]
        assert len(index) == visual_rows + audio_rows, name
        assert (index[:visual_rows] < audio_start).all() and (index[visual_rows:] >= audio_start).all(), name
        assert (sample["positions"] == np.arange(sample["positions"].size)).all(), name
        assert (sample["loss_group"] == LOSS_GROUPS.index(modality)).all(), name
        assert tokenizer.decode(sample["targets"][sample["targets"] != IGNORE_INDEX]).strip() == "a dog</s>", name
    # The still's temporal rows all read its one frame; a video's read FRAMES different frames.
    temporal = lambda name: [i for i in table[name]["modality_index"].tolist() if 0 <= i < f]
    assert len(temporal("item2")) == FRAMES and len(set(temporal("item2"))) == 1
    assert len(set(temporal("item1"))) == FRAMES


def test_long_text_is_cut_to_fit_a_row_beside_its_modality_rows_and_counted(tmp_path, tokenizer, media_dir):
    long_answer = " ".join(f"item{i}" for i in range(200))
    records = [chat("<AUD_VIS>\nitem1", long_answer, video="av.mp4", modality="audio_visual"), chat("item2")]
    config = packed_config((write_jsonl(tmp_path / "d.jsonl", records), 1.0), source_epochs=1, rows=1)
    config.sources[0]["media_root"] = str(media_dir)
    config.max_text_length = 500  # the row, not this, is the limit here
    batches = list(iterator(config, tokenizer))
    first = batches[0]
    assert int(first["num_truncated"].sum()) == 1 and int(first["work"][:, 0].sum()) == 1
    # The whole row is the cut sample: its text plus all FRAMES + SPATIAL + SEGMENTS modality rows.
    assert (first["segment_ids"][0, 0] == 1).all()
    assert (first["modality_index"][0, 0] >= 0).sum() == FRAMES + SPATIAL + SEGMENTS


def test_restored_packing_iterator_yields_the_same_next_batches(tmp_path, tokenizer, media_dir):
    records = [chat(f"<VIS>\nitem{i}", video="silent.mp4", modality="visual") for i in range(5)]
    records += [chat(f"item{i} item{i} item{i}") for i in range(5, 17)]
    config = packed_config((write_jsonl(tmp_path / "d.jsonl", records), 1.0))
    config.sources[0]["media_root"] = str(media_dir)
    live = iterator(config, tokenizer, packs=2)
    for _ in range(2):
        next(live)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(live)))
    manager.wait_until_finished()
    expected = [next(live) for _ in range(4)]  # across the epoch boundary
    fresh = iterator(config, tokenizer, packs=2)
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want in expected:
        got = next(fresh)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_hosts_pack_disjoint_samples_covering_the_data(tmp_path, tokenizer):
    config = packed_config((text_source(tmp_path / "a.jsonl", "a", 12), 1.0), source_epochs=1)
    names = []
    for host in range(2):
        host_names = [
            s["name"]
            for b in iterator(config, tokenizer, packs=2, process_index=host, process_count=2)
            for s in samples_of(b, tokenizer)
        ]
        names.append(host_names)
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == sorted(f"a item{i}" for i in range(12))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(frames=FRAMES - 1), "a video needs num_frames=2 frames"),
        (dict(visual_items=0), "a video needs"),
        (dict(audio_clips=0), "audio_clips=0"),
        (dict(row_length=FRAMES + SPATIAL + SEGMENTS), "leaves no text"),
    ],
)
def test_a_budget_some_sample_cannot_fit_is_refused(tmp_path, tokenizer, fields, message):
    config = packed_config((text_source(tmp_path / "a.jsonl", "a", 4), 1.0), **fields)
    with pytest.raises(ValueError, match=message):
        iterator(config, tokenizer)


def test_epoch_estimate_is_near_the_packed_count(tmp_path, tokenizer):
    records = [chat(" ".join(["item1"] * (i % 9 + 1))) for i in range(60)]
    config = packed_config((write_jsonl(tmp_path / "d.jsonl", records), 1.0), source_epochs=1)
    per_source = pipeline.read_sources(config)
    budget = packing.budget_of(config, ROWS)
    estimate = packer.estimate_samples_per_pack(per_source, [1.0], config, tokenizer, ROWS, budget)
    counts = [int(n) for b in iterator(config, tokenizer) for n in b["work"][:, 0]]
    assert sum(counts) == 60
    assert estimate == pytest.approx(np.mean(counts[:-1]), rel=0.2)


def find_key(state, key):
    """The value stored under `key` anywhere in a nested checkpoint state."""
    if isinstance(state, dict):
        if key in state:
            return state[key]
        for value in state.values():
            if (found := find_key(value, key)) is not None:
                return found
    return None


def test_restore_in_the_middle_of_a_window_with_worker_processes(tmp_path, tokenizer):
    """The window's samples survive a checkpoint taken while it holds some, also when the packer
    runs in a worker process."""
    records = [chat(" ".join([f"item{i}"] * (1 + i % 7))) for i in range(40)]
    config = packed_config((write_jsonl(tmp_path / "d.jsonl", records), 1.0), window=6, rows=1, row_length=64)
    config.worker_count = 1
    live = iterator(config, tokenizer, packs=2)
    next(live)
    state = live.get_state()
    fresh = iterator(config, tokenizer, packs=2)
    fresh.set_state(state)
    expected = [next(live) for _ in range(4)]
    for want in expected:
        got = next(fresh)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_checkpoint_state_names_the_windows_samples(tmp_path, tokenizer):
    records = [chat(" ".join([f"item{i}"] * (1 + i % 7))) for i in range(40)]
    config = packed_config((write_jsonl(tmp_path / "d.jsonl", records), 1.0), window=6, rows=1, row_length=64)
    live = iterator(config, tokenizer, packs=2)
    emitted = {s["name"] for s in samples_of(next(live), tokenizer)}
    state = live.get_state()
    window, read = find_key(state, "window"), find_key(state, "read")
    # Samples 0 .. read were read: each is in the two packs or held (up to 6, refilled at the next pack).
    assert 0 < len(window) <= 6 and window == sorted(window) and read >= max(window)
    assert len(emitted) + len(window) == read + 1
