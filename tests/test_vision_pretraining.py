"""The stand-in for CLIP's pretraining (training/vision_pretraining.py) teaches a random tower
what the demo's questions need of a frame: its class token comes to hold the shape and where it
is, which a random tower's does not, measured by a linear probe fitted apart from the read-out;
and the stills it learns from show what their labels say."""

import numpy as np
import pytest
from flax import nnx

from avllm_jax.data import synthetic
from avllm_jax.models import clip_vision
from avllm_jax.training import vision_pretraining

TOWER = dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2)


def probe(vision) -> dict[str, float]:
    """Ridge probes on the class tokens of 800 new stills (fitted on 600, scored on 200): the
    shape's accuracy and the centre's root-mean-square error in pixels."""
    frames, labels = vision_pretraining.draw_stills(800, np.random.default_rng(7))
    tokens = np.asarray(vision(clip_vision.normalize_frames(frames))[:, 0], np.float64)
    tokens = np.c_[tokens, np.ones(len(tokens))]
    fit, test = slice(0, 600), slice(600, None)
    targets = np.c_[np.eye(len(synthetic.SHAPES))[labels["shape"]], labels["centre"]]
    gram = tokens[fit].T @ tokens[fit] + 1e-3 * np.eye(tokens.shape[1])
    weights = np.linalg.solve(gram, tokens[fit].T @ targets[fit])
    predicted = tokens[test] @ weights
    return {
        "shape": float(np.mean(predicted[:, :-2].argmax(1) == labels["shape"][test])),
        "centre error px": float(np.sqrt(np.mean((predicted[:, -2:] - labels["centre"][test]) ** 2))),
    }


@pytest.fixture(scope="module")
def towers():
    random = clip_vision.CLIPVision(clip_vision.CLIPVisionConfig(**TOWER), rngs=nnx.Rngs(0))
    before = probe(random)
    scores = vision_pretraining.pretrain_vision(random, steps=1500, batch_size=32, learning_rate=1e-3)
    return before, probe(random), scores


def test_the_pretrained_class_token_places_the_shape(towers):
    before, after, _ = towers
    assert after["centre error px"] < 4.5 < 2 * 4.5 < before["centre error px"], (before, after)


def test_the_pretrained_class_token_names_the_shape(towers):
    before, after, _ = towers
    assert after["shape"] > max(0.7, before["shape"] + 0.15), (before, after)


def test_its_readout_scores_new_stills(towers):
    _, _, scores = towers
    assert scores["colour"] > 0.95 and scores["shape"] > 0.75 and scores["centre error px"] < 4.5, scores


def test_stills_show_their_labels_and_every_colour_with_every_shape():
    """draw_stills' labels read back off the pixels: the lit pixels are the labelled colour, the
    lit box is centred on the labelled centre, and the box's fill tells the shape (a square fills
    its box, a circle pi/4 of it, a triangle half). A shape cut by the frame's edge is checked for
    its colour only."""
    frames, labels = vision_pretraining.draw_stills(300, np.random.default_rng(0))
    fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    colours = list(synthetic.STILL_COLOURS.values())
    whole = 0
    for frame, colour, shape, centre in zip(frames, labels["colour"], labels["shape"], labels["centre"], strict=True):
        lit = frame.any(-1)
        ys, xs = np.nonzero(lit)
        assert {tuple(p) for p in frame[lit]} == {colours[colour]}
        if min(xs.min(), ys.min()) == 0 or max(xs.max(), ys.max()) == synthetic.FRAME_SIZE - 1:
            continue
        whole += 1
        np.testing.assert_allclose([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2], centre, atol=1.0)
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        measured = min(fill, key=lambda name: abs(lit.sum() / box - fill[name]))
        assert measured == synthetic.SHAPES[shape]
    assert whole > 200
    pairs = set(zip(labels["colour"].tolist(), labels["shape"].tolist(), strict=True))
    assert len(pairs) == len(synthetic.STILL_COLOURS) * len(synthetic.SHAPES)  # the held-out pairs too
    assert np.ptp(labels["centre"], axis=0).min() > 40  # anywhere, not only at the clips' stops
