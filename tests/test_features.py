"""CLAP log-mel features against the Hugging Face feature extractor.

Random crops: HF's extractor draws its crop offsets from numpy's global legacy generator
(`np.random.randint` for 'rand_trunc', `np.random.choice` over each third for 'fusion'),
one clip after the other. Our function draws the same quantities, in the same order, from
the `rng` it is given. The test replaces those two global functions (monkeypatch, undone
after the test) with draws from a Generator seeded like ours: `randint(lo, hi)` ->
`integers(lo, hi)`, `choice(r)` -> `r[integers(len(r))]` for HF's contiguous ranges. Both
then pick the same crops, so the features must agree everywhere, crops included.
"""

import numpy as np
import pytest
import transformers

from avllm_jax.data.features import clap_audio_features

SR = 48_000
SEED = 7
TOLERANCE = 1e-4  # relative to max |HF| (features are dB values up to ~100)


def _hf_features(waveforms, monkeypatch, *, truncation, padding, max_length_s=10, max_length=None):
    generator = np.random.default_rng(SEED)
    monkeypatch.setattr(np.random, "randint", lambda low, high=None: generator.integers(low, high))
    monkeypatch.setattr(np.random, "choice", lambda options: options[generator.integers(len(options))])
    extractor = transformers.ClapFeatureExtractor(truncation=truncation, padding=padding, max_length_s=max_length_s)
    out = extractor(list(waveforms), sampling_rate=SR, max_length=max_length, return_tensors="np")
    monkeypatch.undo()
    return out["input_features"], out["is_longer"].reshape(-1)


def _clips(seconds, count=2, seed=0):
    rng = np.random.default_rng(seed)
    # a tone plus noise, with a silent stretch so that the dB floor is exercised too
    t = np.arange(int(round(seconds * SR))) / SR
    clips = 0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.05 * rng.standard_normal((count, t.size))
    clips[:, : SR // 10] = 0.0
    return clips.astype(np.float32)


def _check(ours, ours_longer, hf, hf_longer, truncation):
    assert ours.dtype == np.float32 and ours.shape == hf.shape
    np.testing.assert_array_less(np.abs(ours - hf).max(), TOLERANCE * np.abs(hf).max())
    if truncation == "fusion" and not ours_longer.any():
        # HF flags one random clip when none is longer (see features.py); ours stay truthful
        assert hf_longer.sum() == 1
    else:
        np.testing.assert_array_equal(ours_longer, hf_longer)


# shorter than, equal to, longer by less than one hop (HF treats it as fitting) and longer
# than 10 s; padding only applies to the first three
LENGTHS_AND_PADDINGS = [(s, p) for s in (3.0, 10.0, 10.004) for p in ("repeatpad", "repeat", "pad")] + [
    (13.0, "repeatpad")
]


@pytest.mark.parametrize("seconds,padding", LENGTHS_AND_PADDINGS)
@pytest.mark.parametrize("truncation", ["fusion", "rand_trunc"])
def test_clap_features_match_hf(seconds, truncation, padding, monkeypatch):
    waveforms = _clips(seconds)
    hf, hf_longer = _hf_features(waveforms, monkeypatch, truncation=truncation, padding=padding)
    ours, ours_longer = clap_audio_features(
        waveforms, truncation=truncation, padding=padding, rng=np.random.default_rng(SEED)
    )
    assert ours.shape == (2, 4 if truncation == "fusion" else 1, 1001, 64)
    _check(ours, ours_longer, hf, hf_longer, truncation)


@pytest.mark.parametrize("truncation", ["fusion", "rand_trunc"])
@pytest.mark.parametrize("seconds", [0.7, 2.6])
def test_short_windows_match_hf(truncation, seconds, monkeypatch):
    """The CPU demo's windows: 1 s through the extractor's constructor, 1.5 s through `max_length`."""
    waveforms = _clips(seconds, count=3, seed=1)
    for max_length_s, hf_kwargs in ((1, dict(max_length_s=1)), (1.5, dict(max_length=72_000))):
        hf, hf_longer = _hf_features(waveforms, monkeypatch, truncation=truncation, padding="repeatpad", **hf_kwargs)
        ours, ours_longer = clap_audio_features(
            waveforms, truncation=truncation, max_length_s=max_length_s, rng=np.random.default_rng(SEED)
        )
        assert ours.shape[2] == int(max_length_s * SR) // 480 + 1
        _check(ours, ours_longer, hf, hf_longer, truncation)


def test_random_crops_follow_the_generator():
    waveforms = _clips(13.0, count=1)
    for truncation in ("fusion", "rand_trunc"):
        a, _ = clap_audio_features(waveforms, truncation=truncation, rng=np.random.default_rng(1))
        b, _ = clap_audio_features(waveforms, truncation=truncation, rng=np.random.default_rng(1))
        c, _ = clap_audio_features(waveforms, truncation=truncation, rng=np.random.default_rng(2))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="truncation"):
        clap_audio_features(np.zeros((1, SR), np.float32), truncation="center")
    with pytest.raises(ValueError, match="padding"):
        clap_audio_features(np.zeros((1, SR), np.float32), padding="zeros")
    with pytest.raises(ValueError, match="48 kHz"):
        clap_audio_features(np.zeros((1, SR), np.float32), sampling_rate=16_000)
    with pytest.raises(ValueError, match=r"\[K, L\]"):
        clap_audio_features(np.zeros(SR, np.float32))
