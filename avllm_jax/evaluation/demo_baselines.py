"""The demo's baseline: how well one stream alone answers each question type (tools/demo.py prints it)."""

from __future__ import annotations

import collections

import numpy as np

from avllm_jax.data.synthetic import GROUPS, answer, draw_timeline


def one_stream_baselines(num_clips: int = 20000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per question type, the accuracy of the best guesser that sees one stream's timeline
    perfectly and not the other: {type: {"visual": acc, "audio": acc}}.

    Estimated on audio-visual timelines as training draws them: the guesser learns the most
    frequent answer per single-stream timeline on one half, and is scored on the other.
    """
    rng = np.random.default_rng(seed)
    timelines = [draw_timeline(rng) for _ in range(num_clips)]
    keys = {
        "visual": lambda t: (t["shape"], t["direction"], tuple(t["colours"]), tuple(t["stops"])),
        "audio": lambda t: (t["pitch"], tuple(t["beeps"])),
    }
    fit, scored = timelines[: num_clips // 2], timelines[num_clips // 2 :]
    baselines: dict[str, dict[str, float]] = {}
    for question_type in GROUPS:
        baselines[question_type] = {}
        overall = collections.Counter(answer(question_type, t) for t in fit).most_common(1)[0][0]
        for stream, key in keys.items():
            counts: dict[tuple, collections.Counter[str]] = collections.defaultdict(collections.Counter)
            for t in fit:
                counts[key(t)][answer(question_type, t)] += 1
            guess = {k: c.most_common(1)[0][0] for k, c in counts.items()}
            right = sum(guess.get(key(t), overall) == answer(question_type, t) for t in scored)
            baselines[question_type][stream] = right / len(scored)
    return baselines
