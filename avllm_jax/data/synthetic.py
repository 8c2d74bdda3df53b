"""The demo data set: real media files whose content follows a small event timeline, with
questions about it whose answers are computed from that timeline.

A clip is NUM_SEGMENTS equal segments (the demo samples one frame and one audio segment from
each, so frame k and audio segment k show the same quarter of the clip). Its timeline
(`draw_timeline`) says, per segment:

- visual: where one solid shape (circle, square or triangle) is, at one of four stops from
  left to right, and its colour. At one segment boundary, the same for both, the shape
  changes colour and hops one stop left or right; the picture is still within a segment. A
  frame is the same whichever way the shape moves (no trail): only the order of the frames
  tells the direction.
- audio: whether a pure tone (low or high, the same for the clip) beeps. One to three beeps,
  each in its own segment. The first beep comes before or after the visual change with equal
  chance, so the pictures alone cannot tell which colour or stop it coincides with.

Questions are visual (shape, first colour, last colour, direction), audio (pitch, number of
beeps), audio-visual (a visual and an audio answer side by side) or cross-modal timing (the
colour or the stop of the shape when the beeps start: one stream at the moment of the other).
Answers are one or two canonical words, so that held-out exact match is meaningful.

Held-out combinations: HELD_OUT's colour x shape and pitch x beep-count pairs never occur in
a split drawn with `unseen_share=0` (training); a held-out split mixes clips made of them
(flagged "combination": "unseen") with new clips of seen combinations ("seen").

Stage 1's captions of a clip and the stand-in's text lessons are avllm_jax/data/demo_text.py;
the best guess from one stream alone, the demo's baseline, is avllm_jax/evaluation/demo_baselines.py.

Files: audio-visual clips (.mp4, H.264 + AAC), silent clips (.mp4 or .webm, no audio
track) and audio-only files (.flac or .m4a). A sample asks a visual question about a silent
clip, an audio question about an audio-only file, and any kind about an audio-visual clip.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import tqdm

from avllm_jax.data import conversation
from avllm_jax.data.media import Media, write_media
from avllm_jax.modality import Modality

FRAME_SIZE = 64
FPS = 8
CLIP_SECONDS = 1.5
SAMPLE_RATE = 48000
NUM_SEGMENTS = 4  # the timeline's resolution: configs/demo.py's num_frames and num_audio_segments

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
# The stand-in for CLIP also sees colours the clips never show (training/vision_pretraining.py), as the
# lessons name them.
STILL_COLOURS = {**COLOURS, "purple": (128, 0, 128), "orange": (255, 128, 0), "white": (255, 255, 255)}
SHAPES = ("circle", "square", "triangle")
# The demo's shapes move left or right; draw_clip also draws vertical motion.
DIRECTIONS = ("left", "right", "up", "down")
MOTIONS = ("left", "right")
# The stops a shape sits at, in pixels from the left (or top) edge, and their answer words.
STOP_CENTRES = (14, 26, 38, 50)
STOPS = ("far left", "left", "right", "far right")
SHAPE_HALF_SIZES = (11, 13)  # half the shape's size in pixels, drawn from this range
PITCHES = {"low": 330.0, "high": 1760.0}
BEEP_COUNTS = {1: "one", 2: "two", 3: "three"}
# Never in a training split: one colour per shape, one beep count per pitch.
HELD_OUT = {
    "visual": frozenset({("red", "circle"), ("green", "square"), ("blue", "triangle")}),
    "audio": frozenset({("low", 3), ("high", 2)}),
}

# Question templates per question type; `answer` computes each type's answer from a timeline.
VISUAL_QUESTIONS = {
    "shape": ("What shape is shown?", "Which shape is in the video?"),
    "first colour": ("What colour is the shape at the start?", "Which colour does the shape have first?"),
    "last colour": ("What colour is the shape at the end?", "Which colour does the shape have last?"),
    "direction": ("Does the shape move left or right?", "Which way does the shape move?"),
}
AUDIO_QUESTIONS = {
    "pitch": ("Is the tone high or low?", "What is the pitch of the sound?"),
    "beeps": ("How many beeps are there?", "Count the beeps."),
}
# Audio-visual: a visual and an audio answer side by side, in this order.
PAIRED_QUESTIONS = {
    "shape+pitch": ("Which shape is shown and is the tone high or low?",),
    "direction+beeps": ("Which way does the shape move and how many beeps play?",),
}
# Cross-modal timing: the picture at the moment the sound starts.
TIMING_QUESTIONS = {
    "colour at first beep": (
        "What colour is the shape when the beeps start?",
        "Which colour is the shape at the first beep?",
    ),
    "stop at first beep": ("Where is the shape when the beeps start?", "Where is the shape at the first beep?"),
}
QUESTIONS: dict[Modality, Mapping[str, tuple[str, ...]]] = {
    Modality.VISUAL: VISUAL_QUESTIONS,
    Modality.AUDIO: AUDIO_QUESTIONS,
    Modality.AUDIO_VISUAL: {**PAIRED_QUESTIONS, **TIMING_QUESTIONS},
}
# Each question type's group: the columns of the demo's tables.
GROUPS = {
    **{t: "visual" for t in VISUAL_QUESTIONS},
    **{t: "audio" for t in AUDIO_QUESTIONS},
    **{t: "audio_visual" for t in PAIRED_QUESTIONS},
    **{t: "timing" for t in TIMING_QUESTIONS},
}
# Encoder settings that write a demo clip in about 10 ms instead of 40-60 ms.
_FAST_AAC = {"aac_coder": "fast"}
_FAST_VP9 = {"deadline": "realtime", "cpu-used": "8"}
# Fractions of files with each set of streams, and of an audio-visual clip's samples asking
# each modality: a third of all samples ask about both streams.
FILE_KINDS = {Modality.AUDIO_VISUAL: 0.6, Modality.VISUAL: 0.2, Modality.AUDIO: 0.2}
AUDIO_VISUAL_ASKS = {Modality.AUDIO_VISUAL: 0.5, Modality.VISUAL: 0.25, Modality.AUDIO: 0.25}


def draw_timeline(rng: np.random.Generator, *, visual: bool = True, audio: bool = True, unseen: bool = False) -> dict:
    """One clip's events, per segment, for the streams asked for (JSON-serialisable).

    visual: "shape", "direction", "colours" [NUM_SEGMENTS], "stops" [NUM_SEGMENTS] (indices
    into STOPS); audio: "pitch", "beeps" [NUM_SEGMENTS] (bools). `unseen`: each stream
    present holds a HELD_OUT combination; otherwise none does (each stream drawn again until so).
    """
    change = int(rng.integers(1, NUM_SEGMENTS))  # the visual change happens as segment `change` starts
    timeline: dict[str, Any] = {}
    while visual:
        direction = MOTIONS[rng.integers(len(MOTIONS))]
        step = 1 if direction == "right" else -1
        start = int(rng.integers(0, len(STOPS) - 1)) + (step < 0)  # a stop from which the hop stays in the picture
        before, after = (list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
        timeline.update(
            shape=SHAPES[rng.integers(len(SHAPES))],
            direction=direction,
            colours=[before if k < change else after for k in range(NUM_SEGMENTS)],
            stops=[start + step * (k >= change) for k in range(NUM_SEGMENTS)],
        )
        if _holds_held_out(timeline, "visual") == unseen:
            break
    while audio:
        onset = int(rng.integers(0, change) if rng.random() < 0.5 else rng.integers(change, NUM_SEGMENTS))
        count = int(rng.integers(1, min(max(BEEP_COUNTS), NUM_SEGMENTS - onset) + 1))
        later = rng.choice(np.arange(onset + 1, NUM_SEGMENTS), size=count - 1, replace=False)
        timeline.update(
            pitch=list(PITCHES)[rng.integers(len(PITCHES))],
            beeps=[k == onset or k in later for k in range(NUM_SEGMENTS)],
        )
        if _holds_held_out(timeline, "audio") == unseen:
            break
    return timeline


def reversed_timeline(timeline: dict) -> dict:
    """The timeline of the clip played backwards: every per-segment list reversed, the motion
    the other way. Its answers differ from the clip's on the order questions only."""
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    played_back = {key: value[::-1] if isinstance(value, list) else value for key, value in timeline.items()}
    if "direction" in timeline:
        played_back["direction"] = opposite[timeline["direction"]]
    return played_back


def played_back(media: Media) -> Media:
    """Decoded media played backwards at the timeline's resolution: the frames and the audio
    segments in reverse order (each segment's samples as they are). A clip decoded at one frame
    and one audio segment per timeline segment then shows `reversed_timeline` of its timeline."""
    return dataclasses.replace(
        media,
        **{name: getattr(media, name)[::-1].copy() for name in ("frames", "audio") if getattr(media, name) is not None},
    )


def _holds_held_out(timeline: dict, stream: str) -> bool:
    return bool(combinations(timeline)[stream] & HELD_OUT[stream])


def combinations(timeline: dict) -> dict[str, set[tuple]]:
    """The attribute combinations a timeline shows, per stream present: (colour, shape) pairs, (pitch, beep count)."""
    found = {}
    if "shape" in timeline:
        found["visual"] = {(colour, timeline["shape"]) for colour in timeline["colours"]}
    if "pitch" in timeline:
        found["audio"] = {(timeline["pitch"], sum(timeline["beeps"]))}
    return found


# Per single question type: how its answer is read off a timeline, and every answer it can have.
_ANSWERS = {
    "shape": (lambda t: t["shape"], SHAPES),
    "first colour": (lambda t: t["colours"][0], tuple(COLOURS)),
    "last colour": (lambda t: t["colours"][-1], tuple(COLOURS)),
    "direction": (lambda t: t["direction"], MOTIONS),
    "pitch": (lambda t: t["pitch"], tuple(PITCHES)),
    "beeps": (lambda t: BEEP_COUNTS[sum(t["beeps"])], tuple(BEEP_COUNTS.values())),
    "colour at first beep": (lambda t: t["colours"][t["beeps"].index(True)], tuple(COLOURS)),
    "stop at first beep": (lambda t: STOPS[t["stops"][t["beeps"].index(True)]], STOPS),
}


def answer(question_type: str, timeline: dict) -> str:
    """The answer to a question of `question_type` (a key of QUESTIONS' tables) about the clip of `timeline`."""
    return " ".join(_ANSWERS[part][0](timeline) for part in question_type.split("+"))


def answer_words(question_type: str) -> list[str]:
    """Every answer a question type can have."""
    return [" ".join(words) for words in itertools.product(*(_ANSWERS[part][1] for part in question_type.split("+")))]


def render_frames(timeline: dict, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, 64, 64, 3], T = FPS * CLIP_SECONDS: the timeline's shape, still within each segment.

    Size and the fixed coordinate across the motion are jittered per clip. Nothing but the
    stop and the colour changes between segments, so a frame does not show which way the
    shape moves.
    """
    num_frames = round(CLIP_SECONDS * FPS)
    half = int(rng.integers(SHAPE_HALF_SIZES[0], SHAPE_HALF_SIZES[1] + 1))
    lane = FRAME_SIZE / 2 + rng.uniform(-8, 8)
    horizontal = timeline["direction"] in ("left", "right")
    yy, xx = np.mgrid[:FRAME_SIZE, :FRAME_SIZE] + 0.5
    frames = np.zeros((num_frames, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    for t in range(num_frames):
        segment = t * NUM_SEGMENTS // num_frames
        along = STOP_CENTRES[timeline["stops"][segment]]
        cx, cy = (along, lane) if horizontal else (lane, along)
        frames[t][shape_mask(timeline["shape"], xx - cx, yy - cy, half)] = COLOURS[timeline["colours"][segment]]
    return frames


def draw_clip(colour: str, shape: str, direction: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, 64, 64, 3]: a `colour` `shape` hopping one stop in `direction` (any of DIRECTIONS) mid-clip."""
    step = -1 if direction in ("left", "up") else 1
    start = 2 if step < 0 else 1
    half = NUM_SEGMENTS // 2
    timeline = {
        "shape": shape,
        "direction": direction,
        "colours": [colour] * NUM_SEGMENTS,
        "stops": [start + step * (k >= half) for k in range(NUM_SEGMENTS)],
    }
    return render_frames(timeline, rng)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: int) -> np.ndarray:
    """Pixels of `shape` at offsets (dx, dy) from its centre."""
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    return (dy <= half) & (np.abs(dx) * 2 <= dy + half)  # an upright triangle: apex at the top


def render_audio(timeline: dict, rng: np.random.Generator) -> np.ndarray:
    """float32 [n]: a tone burst of the timeline's pitch in the middle 70% of each beeping segment."""
    num_samples = round(CLIP_SECONDS * SAMPLE_RATE)
    segment = num_samples // NUM_SEGMENTS
    frequency = PITCHES[timeline["pitch"]] * rng.uniform(0.95, 1.05)
    beep = np.sin(2 * np.pi * frequency * np.arange(int(segment * 0.7)) / SAMPLE_RATE)
    beep *= np.minimum(1.0, np.minimum(np.arange(beep.size), np.arange(beep.size)[::-1]) / 480)  # 10 ms ramps
    audio = np.zeros(num_samples)
    for k, sounds in enumerate(timeline["beeps"]):
        if sounds:
            start = k * segment + (segment - beep.size) // 2
            audio[start : start + beep.size] = rng.uniform(0.3, 0.6) * beep
    return audio.astype(np.float32)


def tone_pattern(pitch: str, beeps: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [n]: `beeps` tone bursts, each in its own segment (segments chosen at random)."""
    chosen = rng.choice(NUM_SEGMENTS, size=beeps, replace=False)
    return render_audio({"pitch": pitch, "beeps": [k in chosen for k in range(NUM_SEGMENTS)]}, rng)


def make_demo_split(
    out_dir: str | os.PathLike,
    split: str,
    num_samples: int,
    seed: int,
    turns_per_sample: int = 1,
    *,
    unseen_share: float = 0.0,
    every_question: bool = False,
) -> pathlib.Path:
    """Writes `num_samples` clips as out_dir/media/{split}_NNNNN.* and their samples to
    out_dir/{split}.jsonl (paths relative to out_dir); returns the JSONL's path.

    `turns_per_sample` > 1 asks that many different questions about each clip in one
    conversation (as many as its modality has, at most): more supervision per decoded clip,
    which is what a CPU-bound training run is short of. `unseen_share`: the fraction of clips
    made of HELD_OUT combinations (0 for training). `every_question`: one sample per question
    type of the clip's modality instead (a held-out split scored per type). Each sample
    carries its clip's "timeline", its "questions" (types, one per turn) and "combination".
    """
    out_dir = pathlib.Path(out_dir)
    (out_dir / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    jsonl_path = out_dir / f"{split}.jsonl"
    with open(jsonl_path, "w") as out:
        for index in tqdm.trange(num_samples, desc=f"demo {split}", unit="clip"):
            for sample in _make_samples(
                out_dir, f"{split}_{index:05d}", rng, turns_per_sample, rng.random() < unseen_share, every_question
            ):
                out.write(json.dumps(sample) + "\n")
    return jsonl_path


def _make_samples(
    out_dir: pathlib.Path, name: str, rng: np.random.Generator, turns: int, unseen: bool, every_question: bool
) -> list[dict]:
    kind = _draw(rng, FILE_KINDS)
    timeline = draw_timeline(rng, visual=kind.has_visual, audio=kind.has_audio, unseen=unseen)
    path = _write_clip(out_dir, name, kind, timeline, rng)
    modality = _draw(rng, AUDIO_VISUAL_ASKS) if kind == Modality.AUDIO_VISUAL else kind
    table = QUESTIONS[modality]
    types = list(table)
    if every_question:
        askings = [[t] for t in types]
    else:
        askings = [[types[i] for i in rng.permutation(len(types))[:turns]]]
    samples = []
    for asked in askings:
        conversations: list[dict[str, str]] = []
        for question_type in asked:
            question = str(rng.choice(table[question_type]))
            if not conversations:
                question = conversation.first_user_message(question, modality)
            conversations += [
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer(question_type, timeline)},
            ]
        samples.append(
            {
                "id": f"{name}_{asked[0]}" if every_question else name,
                "video" if kind.has_visual else "audio": path,
                "modality": modality.value,
                "conversations": conversations,
                "questions": asked,
                "combination": "unseen" if unseen else "seen",
                "timeline": timeline,
            }
        )
    return samples


def _draw(rng: np.random.Generator, shares: dict[Modality, float]) -> Modality:
    return Modality(rng.choice(list(shares), p=list(shares.values())))


def _write_clip(out_dir: pathlib.Path, name: str, kind: Modality, timeline: dict, rng: np.random.Generator) -> str:
    """Renders and encodes the clip; returns its path relative to out_dir."""
    frames = render_frames(timeline, rng) if kind.has_visual else None
    audio = render_audio(timeline, rng) if kind.has_audio else None
    if kind == Modality.AUDIO:
        path = f"media/{name}" + rng.choice([".flac", ".m4a"])
        write_media(
            out_dir / path,
            audio=audio,
            audio_codec="flac" if path.endswith(".flac") else "aac",
            audio_options=_FAST_AAC,
            sample_rate=SAMPLE_RATE,
        )
    elif kind == Modality.VISUAL:
        path = f"media/{name}" + rng.choice([".mp4", ".webm"])
        if path.endswith(".mp4"):
            write_media(out_dir / path, frames=frames, fps=FPS)
        else:
            write_media(out_dir / path, frames=frames, video_codec="libvpx-vp9", video_options=_FAST_VP9, fps=FPS)
    else:
        path = f"media/{name}.mp4"
        write_media(
            out_dir / path, frames=frames, audio=audio, audio_options=_FAST_AAC, fps=FPS, sample_rate=SAMPLE_RATE
        )
    return path


def demo_tokenizer_corpus() -> list[str]:
    """Every piece of text the demo can produce, for training its tokenizer."""
    questions = [q for table in QUESTIONS.values() for qs in table.values() for q in qs]
    answers = sorted({word for question_type in GROUPS for word in answer_words(question_type)})
    roles = f"{conversation.USER_ROLE}: {conversation.ASSISTANT_ROLE}:"
    return [conversation.SYSTEM_PROMPT, roles, "\n".join(questions), *questions, *answers]  # the join adds "\n"
