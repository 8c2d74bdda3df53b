"""The demo set: the split rules hold over the written files, and every answer, the cross-modal
timing ones included, can be read back from the decoded media's own timeline."""

import json

import numpy as np
import pytest

from avllm_jax.data import conversation as conv
from avllm_jax.data import synthetic
from avllm_jax.data.media import load_media
from avllm_jax.evaluation import demo_baselines
from avllm_jax.modality import Modality

NUM_TRAIN, NUM_EVAL = 30, 24


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A training split (three questions a clip) and a held-out split (every question, half unseen), as "
    "tools/demo.py writes them."""
    out = tmp_path_factory.mktemp("demo")
    train = synthetic.make_demo_split(out, "train", NUM_TRAIN, seed=3, turns_per_sample=3)
    held_out = synthetic.make_demo_split(out, "eval", NUM_EVAL, seed=4, unseen_share=0.5, every_question=True)
    splits = {}
    for name, path in (("train", train), ("eval", held_out)):
        samples, malformed = conv.read_samples(path)
        assert malformed == []
        records = [json.loads(line) for line in path.read_text().splitlines()]
        splits[name] = list(zip(samples, records, strict=True))
    assert len(splits["train"]) == NUM_TRAIN and len(splits["eval"]) > NUM_EVAL
    return splits


def decode(path):
    return load_media(path, num_frames=4, image_size=64, num_audio_segments=4)


def measure(media):
    """The timeline read off decoded media (4 frames, 4 audio segments), independently of how it was drawn."""
    timeline = {}
    if media.has_visual:
        shapes, colours, stops = [], [], []
        for frame in media.frames:
            lit = frame.max(axis=-1) > 128
            value = np.median(frame[lit], axis=0)
            colours.append(min(synthetic.COLOURS, key=lambda c: np.abs(value - synthetic.COLOURS[c]).sum()))
            rows, cols = np.nonzero(lit)
            fill = lit.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
            shapes.append("square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle")
            centre = (cols.min() + cols.max() + 1) / 2
            stops.append(int(np.argmin(np.abs(np.array(synthetic.STOP_CENTRES) - centre))))
        assert len(set(shapes)) == 1, shapes
        direction = "right" if stops[-1] > stops[0] else "left"
        timeline.update(shape=shapes[0], direction=direction, colours=colours, stops=stops)
    if media.has_audio:
        loudness = np.sqrt((media.audio**2).mean(axis=1))
        loudest = media.audio[np.argmax(loudness)]
        peak = np.argmax(np.abs(np.fft.rfft(loudest))) * 48000 / loudest.size
        timeline.update(pitch="low" if peak < 800 else "high", beeps=[bool(x) for x in loudness > 0.05])
    return timeline


def test_decoded_media_show_the_timeline_segment_by_segment(demo):
    """Frame k and audio segment k of every written file show segment k of its timeline: the
    alignment the cross-modal questions rely on."""
    kinds = set()
    for sample, record in demo["train"] + demo["eval"]:
        measured = measure(decode(sample.media_path))
        assert measured == record["timeline"], (sample.id, measured, record["timeline"])
        kinds.add(Modality.from_flags("shape" in measured, "pitch" in measured))
    assert kinds == set(Modality)


def test_a_played_back_file_shows_the_reversed_timeline(demo):
    """tools/demo.py --played-back scores decoded clips played backwards against
    reversed_timeline: what the reversed media show is that timeline."""
    clips = {sample.media_path: record["timeline"] for sample, record in demo["eval"]}
    for path, timeline in clips.items():
        measured = measure(synthetic.played_back(decode(path)))
        assert measured == synthetic.reversed_timeline(timeline), (path, measured)
    assert len(clips) == NUM_EVAL


def test_every_answer_is_the_decoded_timelines(demo):
    """Each turn's answer, cross-modal timing ones included, recomputed from the timeline read
    off the file (not from the question text)."""
    asked = set()
    for sample, record in demo["train"] + demo["eval"]:
        measured = measure(decode(sample.media_path))
        answers = [text for role, text in sample.turns[1::2]]
        assert len(answers) == len(record["questions"])
        for question_type, given in zip(record["questions"], answers, strict=True):
            assert question_type in synthetic.QUESTIONS[sample.modality]
            assert given == synthetic.answer(question_type, measured), (sample.id, question_type, measured)
            asked.add(question_type)
    assert asked == set(synthetic.GROUPS)


def test_colour_at_first_beep_is_the_frame_colour_in_the_first_beeping_segment(demo):
    checked = 0
    for sample, record in demo["eval"]:
        if record["questions"] == ["colour at first beep"]:
            media = load_media(sample.media_path, num_frames=4, image_size=64, num_audio_segments=4)
            first = int(np.argmax(np.sqrt((media.audio**2).mean(axis=1)) > 0.05))
            frame = media.frames[first]
            value = np.median(frame[frame.max(axis=-1) > 128], axis=0)
            assert np.abs(value - synthetic.COLOURS[sample.turns[1][1]]).max() < 40, (sample.id, value)
            checked += 1
    assert checked > 0


def test_no_held_out_combination_in_the_training_split(demo):
    """Read off the decoded files: no colour x shape or pitch x beep-count pair of HELD_OUT."""
    for sample, record in demo["train"]:
        assert record["combination"] == "seen"
        for stream, pairs in synthetic.combinations(measure(decode(sample.media_path))).items():
            assert not pairs & synthetic.HELD_OUT[stream], (sample.id, pairs)


def test_held_out_split_flags_each_sample_seen_or_unseen(demo):
    """An unseen sample holds a held-out pair in every stream its file has, a seen one in none; both kinds occur."""
    flags = set()
    for sample, record in demo["eval"]:
        found = synthetic.combinations(measure(decode(sample.media_path)))
        held = [bool(pairs & synthetic.HELD_OUT[stream]) for stream, pairs in found.items()]
        assert held and all(held) if record["combination"] == "unseen" else not any(held), (sample.id, found)
        flags.add(record["combination"])
    assert flags == {"seen", "unseen"}


def test_a_frame_does_not_show_the_direction():
    """The clip of a shape moving left is the clip moving right played backwards, frame for
    frame: only the order of the frames tells them apart."""
    right = {
        "shape": "triangle",
        "direction": "right",
        "colours": ["red", "red", "blue", "blue"],
        "stops": [1, 1, 2, 2],
    }
    left = {"shape": "triangle", "direction": "left", "colours": ["blue", "blue", "red", "red"], "stops": [2, 2, 1, 1]}
    frames_right = synthetic.render_frames(right, np.random.default_rng(5))
    frames_left = synthetic.render_frames(left, np.random.default_rng(5))
    assert not np.array_equal(frames_right, frames_left)
    np.testing.assert_array_equal(frames_right, frames_left[::-1])


def test_a_reversed_timeline_renders_the_clip_played_backwards():
    """tools/demo.py's played-back probe plays the decoded clip backwards and scores it against
    reversed_timeline: the frames of that timeline are the clip's in reverse order, and only
    the order questions change their answers."""
    rng = np.random.default_rng(11)
    changed = set()
    for seed in range(40):
        timeline = synthetic.draw_timeline(rng)
        backwards = synthetic.reversed_timeline(timeline)
        np.testing.assert_array_equal(
            synthetic.render_frames(backwards, np.random.default_rng(seed)),
            synthetic.render_frames(timeline, np.random.default_rng(seed))[::-1],
        )
        assert backwards["beeps"] == timeline["beeps"][::-1] and backwards["direction"] != timeline["direction"]
        assert synthetic.answer("first colour", backwards) == synthetic.answer("last colour", timeline)
        last_beep = max(k for k, beeps in enumerate(timeline["beeps"]) if beeps)
        assert synthetic.answer("colour at first beep", backwards) == timeline["colours"][last_beep]
        changed |= {t for t in synthetic.GROUPS if synthetic.answer(t, backwards) != synthetic.answer(t, timeline)}
    assert changed == {
        "first colour",
        "last colour",
        "direction",
        "direction+beeps",
        "colour at first beep",
        "stop at first beep",
    }


def test_one_frame_and_its_place_tell_the_direction_at_most_two_times_in_three():
    """Even knowing which frame it is, the best guess from one frame's stop is right at most
    2/3 of the time (only a shape at an edge stop gives its direction away)."""
    rng = np.random.default_rng(0)
    timelines = [synthetic.draw_timeline(rng, audio=False) for _ in range(3000)]
    for k in range(synthetic.NUM_SEGMENTS):
        counts = {}
        for t in timelines:
            counts.setdefault(t["stops"][k], []).append(t["direction"])
        best = sum(max(d.count("left"), d.count("right")) for d in counts.values()) / len(timelines)
        assert best < 0.72, (k, best)


def test_timing_questions_need_both_streams():
    baselines = demo_baselines.one_stream_baselines(num_clips=4000)
    for question_type in synthetic.TIMING_QUESTIONS:
        assert baselines[question_type]["visual"] < 0.6 and baselines[question_type]["audio"] < 0.4, baselines[
            question_type
        ]
    assert baselines["shape"]["visual"] == 1.0 and baselines["pitch"]["audio"] == 1.0


def test_splits_are_deterministic_per_seed_and_differ_across_seeds(tmp_path):
    a = synthetic.make_demo_split(tmp_path / "a", "train", 4, seed=7).read_text()
    b = synthetic.make_demo_split(tmp_path / "b", "train", 4, seed=7).read_text()
    c = synthetic.make_demo_split(tmp_path / "c", "train", 4, seed=8).read_text()
    assert a == b and a != c
    assert (tmp_path / "a/media").exists() and sorted(p.name for p in (tmp_path / "a/media").iterdir()) == sorted(
        p.name for p in (tmp_path / "b/media").iterdir()
    )


def test_tokenizer_corpus_covers_the_demo_text(demo):
    tokenizer = conv.train_tokenizer(synthetic.demo_tokenizer_corpus(), vocab_size=400)
    conv.add_modality_tokens(tokenizer)
    byte_tokens = {f"<0x{b:02X}>" for b in range(256)}
    for sample, _ in demo["train"] + demo["eval"]:
        ids, _ = conv.tokenize_turns(sample.turns, tokenizer)
        tokens = set(tokenizer.convert_ids_to_tokens(ids.tolist()))
        assert not tokens & (byte_tokens | {"<unk>"}), sample.turns
