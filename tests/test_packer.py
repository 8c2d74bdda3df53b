"""The look-ahead packer's placement (data/packer.py), on footprints alone: whole samples, each
exactly once, within every budget, the oldest held sample first, and fuller packs than packing
in order. The pipeline side (resume, hosts) is in test_packing.py."""

import numpy as np
import pytest

from avllm_jax.data import packer, packing
from avllm_jax.data.packing import Footprint, PackBudget


def text(length):
    return Footprint(length, 0, 0)


def test_a_long_sample_does_not_strand_the_rest_of_its_row():
    # In order: [6], [6, 4], [4] (the second 6 closes the first pack); the window pairs them.
    budget = PackBudget(rows=1, row_length=10, frames=1, visual_items=1, audio_clips=1)
    packs = packer.plan([text(6), text(6), text(4), text(4)], budget, window=4)
    assert [[i for i, _, _ in p] for p in packs] == [[0, 2], [1, 3]]
    assert packs[0] == [(0, 0, 0), (2, 0, 6)]  # (sample, row, offset)


def test_media_and_positions_fill_together():
    # Two rows of 10, 4 frames: two 4-frame videos never share a pack. The oldest video goes
    # first, then the sample most like what is left: text fills the positions the frames left.
    budget = PackBudget(rows=2, row_length=10, frames=4, visual_items=2, audio_clips=1)
    video, long_text = Footprint(8, 4, 0), text(10)
    packs = packer.plan([video, video, long_text, long_text], budget, window=4)
    assert [sorted(i for i, _, _ in p) for p in packs] == [[0, 2], [1, 3]]


def test_random_streams_place_every_sample_once_within_budget_oldest_first():
    rng = np.random.default_rng(0)
    budget = PackBudget(rows=3, row_length=100, frames=24, visual_items=6, audio_clips=3)
    needs = [
        Footprint(int(rng.integers(5, 90)), int(rng.choice([0, 1, 4])), int(rng.random() < 0.3)) for _ in range(300)
    ]
    window = 8
    packs = packer.plan(needs, budget, window)
    placed = [i for pack in packs for i, _, _ in pack]
    assert sorted(placed) == list(range(len(needs)))
    emitted = set()
    for pack in packs:
        packing.check_places([needs[i] for i, _, _ in pack], [(r, o) for _, r, o in pack], budget)
        oldest = min(set(range(len(needs))) - emitted)
        assert pack[0][0] == oldest
        # Nothing is taken from beyond the window: the held samples are the oldest `window` not yet emitted.
        held = sorted(set(range(len(needs))) - emitted)[:window]
        assert {i for i, _, _ in pack} <= set(held)
        emitted |= {i for i, _, _ in pack}
    # Samples of 47 positions on average, about 5 a pack: 82% full with 8 held (63% with 4).
    positions = sum(n.length for n in needs) / (len(packs) * budget.rows * budget.row_length)
    assert positions > 0.8


def test_a_sample_larger_than_an_empty_pack_is_an_error():
    budget = PackBudget(rows=1, row_length=10, frames=1, visual_items=1, audio_clips=1)
    with pytest.raises(ValueError, match="does not fit an empty pack"):
        packer.plan([text(11)], budget, window=2)


def test_assemble_refuses_overlapping_places():
    budget = PackBudget(rows=1, row_length=10, frames=1, visual_items=1, audio_clips=1)
    with pytest.raises(ValueError, match="does not fit"):
        packing.check_places([text(6), text(4)], [(0, 0), (0, 5)], budget)
