"""The demo set: files decode, and every answer can be read back from the decoded media."""
import numpy as np
import pytest

from avllm_jax.data import conversation as conv
from avllm_jax.data import synthetic
from avllm_jax.data.media import load_media
from avllm_jax.modality import Modality

NUM = 30


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    path = synthetic.make_demo_split(out, "train", NUM, seed=3)
    samples, malformed = conv.read_samples(path)
    assert malformed == [] and len(samples) == NUM
    return out, samples


def measure_visual(frames):
    """(colour, shape, direction) read off the pixels, independently of how they were drawn.
    The shape is at full brightness; its trail is at most 0.6 of it."""
    lit = frames.max(axis=-1) > 200
    first, last = np.argwhere(lit[0]), np.argwhere(lit[-1])
    colour_value = np.median(frames[0][lit[0]], axis=0)
    colour = min(synthetic.COLOURS, key=lambda c: np.abs(colour_value - synthetic.COLOURS[c]).sum())
    (top, left), (bottom, right) = first.min(axis=0), first.max(axis=0)
    fill = lit[0].sum() / ((bottom - top + 1) * (right - left + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    dy, dx = last.mean(axis=0) - first.mean(axis=0)
    direction = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    return {"colour": colour, "shape": shape, "direction": direction}


def measure_audio(segments):
    """(pitch, beeps): the dominant frequency and the number of sounding segments."""
    signal = segments.reshape(-1)
    peak = np.argmax(np.abs(np.fft.rfft(signal))) * 48000 / signal.size
    sounding = int((np.sqrt((segments**2).mean(axis=1)) > 0.05).sum())
    return {"pitch": "low" if peak < 800 else "high", "beeps": synthetic.BEEP_COUNTS[sounding]}


WORD_KINDS = {
    **{w: "colour" for w in synthetic.COLOURS},
    **{w: "shape" for w in synthetic.SHAPES},
    **{w: "direction" for w in synthetic.DIRECTIONS},
    **{w: "pitch" for w in synthetic.PITCHES},
    **{w: "beeps" for w in synthetic.BEEP_COUNTS.values()},
}


def test_answers_match_the_decoded_media(demo):
    _, samples = demo
    modalities = set()
    for sample in samples:
        media = load_media(sample.media_path, num_frames=8, image_size=64, num_audio_segments=4)
        has_visual, has_audio = sample.modality.has_visual, sample.modality.has_audio
        assert (not has_visual or media.has_visual) and (not has_audio or media.has_audio), sample.id
        measured = {}
        if media.has_visual:
            measured.update(measure_visual(media.frames))
        if media.has_audio:
            measured.update(measure_audio(media.audio))
        words = sample.turns[1][1].split()
        assert 1 <= len(words) <= 2 and all(w in WORD_KINDS for w in words), sample.turns
        for word in words:
            assert measured[WORD_KINDS[word]] == word, (sample.id, sample.turns, measured)
        modalities.add(sample.modality)
    assert modalities == set(Modality)


def test_file_kinds_include_silent_clips_and_audio_only_files(demo):
    _, samples = demo
    kinds = set()
    for sample in samples:
        media = load_media(sample.media_path, num_frames=2, image_size=16)
        kinds.add((media.has_visual, media.has_audio))
    assert kinds == {(True, False), (False, True), (True, True)}


def test_splits_are_deterministic_per_seed_and_differ_across_seeds(tmp_path):
    a = synthetic.make_demo_split(tmp_path / "a", "train", 4, seed=7).read_text()
    b = synthetic.make_demo_split(tmp_path / "b", "train", 4, seed=7).read_text()
    c = synthetic.make_demo_split(tmp_path / "c", "train", 4, seed=8).read_text()
    assert a == b and a != c
    assert (tmp_path / "a/media").exists() and sorted(p.name for p in (tmp_path / "a/media").iterdir()) == sorted(
        p.name for p in (tmp_path / "b/media").iterdir()
    )


def test_tokenizer_corpus_covers_the_demo_text(demo):
    _, samples = demo
    tokenizer = conv.train_tokenizer(synthetic.demo_tokenizer_corpus(), vocab_size=400)
    conv.add_modality_tokens(tokenizer)
    byte_tokens = {f"<0x{b:02X}>" for b in range(256)}
    for sample in samples:
        ids, _ = conv.tokenize_turns(sample.turns, tokenizer)
        tokens = set(tokenizer.convert_ids_to_tokens(ids.tolist()))
        assert not tokens & (byte_tokens | {"<unk>"}), sample.turns
