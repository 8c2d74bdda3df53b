"""The demo data set: real media files of moving shapes and tone patterns, with questions about them.

Every clip shows one large solid shape (circle, square or triangle) in a pure colour
crossing a black 64x64 picture in one direction, with a fading trail behind it, and/or
plays a pure tone (low or high) as one to three beeps. Each beep fills most of one quarter
of the clip, so with four audio segments (the default `num_audio_segments`) every segment
holds at most one beep and the count is the number of segments that sound. Answers are one
or two canonical words so that held-out exact match is meaningful.

Files: audio-visual clips (.mp4, H.264 + AAC), silent clips (.mp4 or .webm, no audio
track) and audio-only files (.flac or .m4a). A sample asks a visual question about a silent
clip, an audio question about an audio-only file, and any kind about an audio-visual clip.
"""
from __future__ import annotations

import itertools
import json
import os
import pathlib
from collections.abc import Iterable

import av
import numpy as np
import tqdm

from avllm_jax.data import conversation
from avllm_jax.modality import Modality

FRAME_SIZE = 64
FPS = 8
CLIP_SECONDS = 1.5
SAMPLE_RATE = 48000

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
PITCHES = {"low": 330.0, "high": 1760.0}
BEEP_COUNTS = {1: "one", 2: "two", 3: "three"}
# The trail: copies of the shape every TRAIL_STEP pixels behind it, from TRAIL_BRIGHTNESS of
# the shape's brightness (dimmer, so the shape's outline stays visible) fading linearly to
# nothing TRAIL_PIXELS behind it.
TRAIL_PIXELS = 42
TRAIL_STEP = 3
TRAIL_BRIGHTNESS = 0.6

# Question templates per attribute; the answer is the attribute's canonical word.
VISUAL_QUESTIONS = {
    "colour": ("What colour is the shape?", "Which colour does the moving shape have?"),
    "shape": ("What shape is shown?", "Which shape moves in the video?"),
    "direction": ("Which way does the shape move?", "In which direction is the shape moving?"),
}
AUDIO_QUESTIONS = {
    "pitch": ("Is the tone high or low?", "What is the pitch of the sound?"),
    "beeps": ("How many beeps are there?", "Count the beeps."),
}
# Questions that need both streams; the answer is the two attributes' words in this order.
AUDIO_VISUAL_QUESTIONS = {
    ("colour", "pitch"): ("What colour is the shape and is the tone high or low?",),
    ("shape", "beeps"): ("Which shape is shown and how many beeps play?",),
    ("direction", "pitch"): ("Where does the shape move and what is the pitch?",),
}
QUESTIONS = {Modality.VISUAL: VISUAL_QUESTIONS, Modality.AUDIO: AUDIO_QUESTIONS, Modality.AUDIO_VISUAL: AUDIO_VISUAL_QUESTIONS}
# Encoder settings that write a demo clip in about 10 ms instead of 40-60 ms.
_FAST_AAC = {"aac_coder": "fast"}
_FAST_VP9 = {"deadline": "realtime", "cpu-used": "8"}
# Fractions of files with each set of streams.
FILE_KINDS = {Modality.AUDIO_VISUAL: 0.5, Modality.VISUAL: 0.25, Modality.AUDIO: 0.25}


def write_media(
    path: str | os.PathLike,
    *,
    frames: Iterable[np.ndarray] | None = None,
    fps: int = FPS,
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    pix_fmt: str = "yuv420p",
    audio_layout: str = "mono",
    container_format: str | None = None,
    video_options: dict[str, str] | None = None,
    audio_options: dict[str, str] | None = None,
) -> None:
    """Encodes uint8 RGB `frames` (an array [T, H, W, 3] or any iterable of [H, W, 3]) and/or
    float32 `audio` [channels, n] (or [n]) with PyAV.

    The container comes from the file name unless `container_format` is given (e.g. "image2"
    with one frame for a still). Used by the demo set, the tests and the loader benchmark.
    """
    planar = None if audio is None else np.ascontiguousarray(np.atleast_2d(audio), dtype=np.float32)
    with av.open(os.fspath(path), "w", format=container_format) as container:
        video_stream = audio_stream = None
        if frames is not None:
            frames = iter(frames)
            first = next(frames)
            frames = itertools.chain([first], frames)
            video_stream = container.add_stream(video_codec, rate=fps, options=video_options or {})
            video_stream.height, video_stream.width = first.shape[:2]
            video_stream.pix_fmt = pix_fmt
        if planar is not None:
            audio_stream = container.add_stream(audio_codec, rate=sample_rate, layout=audio_layout, options=audio_options or {})

        def encode_audio(start, stop):
            if audio_stream is not None and stop > start:
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start:stop]), format="fltp", layout=audio_layout)
                frame.sample_rate, frame.pts = sample_rate, start
                container.mux(audio_stream.encode(frame))

        audio_done = 0  # interleave: each video frame is followed by its share of the audio
        for index, image in enumerate(frames or ()):
            container.mux(video_stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            if planar is not None:
                stop = min(planar.shape[1], round((index + 1) * sample_rate / fps))
                encode_audio(audio_done, stop)
                audio_done = max(audio_done, stop)
        if planar is not None:
            encode_audio(audio_done, planar.shape[1])
            container.mux(audio_stream.encode())
        if video_stream is not None:
            container.mux(video_stream.encode())


def draw_clip(colour: str, shape: str, direction: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, 64, 64, 3]: the shape crossing the picture in `direction`, with a little jitter.

    It leaves a fading trail, like a long exposure's motion blur, so that every frame shows
    which way it moves. Without the trail the direction is only in the order of the frames,
    and the demo's tiny LLM, trained from scratch for minutes, did not learn to read it
    (the sign of the motion stayed at chance after 2000 steps).
    """
    num_frames = round(CLIP_SECONDS * FPS)
    half = int(rng.integers(14, 18))  # half the shape's size in pixels
    lane = FRAME_SIZE / 2 + rng.uniform(-6, 6)  # the fixed coordinate across the motion
    travel = np.linspace(half + 2, FRAME_SIZE - half - 2, num_frames)
    backwards = direction in ("left", "up")
    if backwards:
        travel = travel[::-1]
    yy, xx = np.mgrid[:FRAME_SIZE, :FRAME_SIZE] + 0.5
    frames = np.zeros((num_frames, FRAME_SIZE, FRAME_SIZE, 3), np.float32)
    rgb = np.array(COLOURS[colour], np.float32)
    for t, position in enumerate(travel):
        for lag in range(TRAIL_PIXELS - TRAIL_STEP, -1, -TRAIL_STEP):  # faintest first, the shape itself last
            brightness = TRAIL_BRIGHTNESS * (1.0 - lag / TRAIL_PIXELS) if lag else 1.0
            shifted = position + (lag if backwards else -lag)
            cx, cy = (shifted, lane) if direction in ("left", "right") else (lane, shifted)
            frames[t][_inside(shape, xx - cx, yy - cy, half)] = brightness * rgb
    return np.round(frames).astype(np.uint8)


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, half: int) -> np.ndarray:
    """Pixels of `shape` at offsets (dx, dy) from its centre."""
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    return (dy <= half) & (np.abs(dx) * 2 <= dy + half)  # an upright triangle: apex at the top


def tone_pattern(pitch: str, beeps: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [n]: `beeps` tone bursts, each in its own quarter of the clip (quarters chosen at random)."""
    num_samples = round(CLIP_SECONDS * SAMPLE_RATE)
    quarter = num_samples // 4
    frequency = PITCHES[pitch] * rng.uniform(0.95, 1.05)
    beep = np.sin(2 * np.pi * frequency * np.arange(int(quarter * 0.7)) / SAMPLE_RATE)
    beep *= np.minimum(1.0, np.minimum(np.arange(beep.size), np.arange(beep.size)[::-1]) / 480)  # 10 ms ramps
    audio = np.zeros(num_samples)
    for q in rng.choice(4, size=beeps, replace=False):
        start = q * quarter + (quarter - beep.size) // 2
        audio[start : start + beep.size] = rng.uniform(0.3, 0.6) * beep
    return audio.astype(np.float32)


def make_demo_split(out_dir: str | os.PathLike, split: str, num_samples: int, seed: int, turns_per_sample: int = 1) -> pathlib.Path:
    """Writes out_dir/media/{split}_NNNNN.* and out_dir/{split}.jsonl (paths relative to out_dir).

    `turns_per_sample` > 1 asks that many different questions about each clip in one
    conversation (as many as its modality has, at most): more supervision per decoded clip,
    which is what a CPU-bound training run is short of.
    """
    out_dir = pathlib.Path(out_dir)
    (out_dir / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    jsonl_path = out_dir / f"{split}.jsonl"
    with open(jsonl_path, "w") as out:
        for index in tqdm.trange(num_samples, desc=f"demo {split}", unit="clip"):
            sample = _make_sample(out_dir, f"{split}_{index:05d}", rng, turns_per_sample)
            out.write(json.dumps(sample) + "\n")
    return jsonl_path


def _make_sample(out_dir: pathlib.Path, name: str, rng: np.random.Generator, turns: int) -> dict:
    kind = Modality(rng.choice(list(FILE_KINDS), p=list(FILE_KINDS.values())))
    attributes = {
        "colour": rng.choice(list(COLOURS)),
        "shape": rng.choice(SHAPES),
        "direction": rng.choice(DIRECTIONS),
        "pitch": rng.choice(list(PITCHES)),
        "beeps": int(rng.choice(list(BEEP_COUNTS))),
    }
    frames = draw_clip(attributes["colour"], attributes["shape"], attributes["direction"], rng) if kind.has_visual else None
    audio = tone_pattern(attributes["pitch"], attributes["beeps"], rng) if kind.has_audio else None
    if kind == Modality.AUDIO:
        path = f"media/{name}" + rng.choice([".flac", ".m4a"])
        write_media(out_dir / path, audio=audio, audio_codec="flac" if path.endswith(".flac") else "aac", audio_options=_FAST_AAC)
    elif kind == Modality.VISUAL:
        path = f"media/{name}" + rng.choice([".mp4", ".webm"])
        if path.endswith(".mp4"):
            write_media(out_dir / path, frames=frames)
        else:
            write_media(out_dir / path, frames=frames, video_codec="libvpx-vp9", video_options=_FAST_VP9)
    else:
        path = f"media/{name}.mp4"
        write_media(out_dir / path, frames=frames, audio=audio, audio_options=_FAST_AAC)

    modality = Modality(rng.choice(list(Modality))) if kind == Modality.AUDIO_VISUAL else kind
    words = {**attributes, "beeps": BEEP_COUNTS[attributes["beeps"]]}
    table = QUESTIONS[modality]
    asked = list(table)
    conversations = []
    for index in rng.permutation(len(asked))[:turns]:
        attribute = asked[index]
        question = rng.choice(table[attribute])
        answer = " ".join(words[a] for a in attribute) if isinstance(attribute, tuple) else words[attribute]
        if not conversations:
            question = conversation.first_user_message(question, modality)
        conversations += [{"from": "human", "value": str(question)}, {"from": "gpt", "value": str(answer)}]
    media_key = "video" if kind.has_visual else "audio"
    return {"id": name, media_key: path, "modality": modality.value, "conversations": conversations}


def demo_tokenizer_corpus() -> list[str]:
    """Every piece of text the demo can produce, for training its tokenizer."""
    questions = [q for table in QUESTIONS.values() for qs in table.values() for q in qs]
    answers = [*COLOURS, *SHAPES, *DIRECTIONS, *PITCHES, *BEEP_COUNTS.values()]
    roles = f"{conversation.USER_ROLE}: {conversation.ASSISTANT_ROLE}:"
    return [conversation.SYSTEM_PROMPT, roles, "\n".join(questions), *questions, *answers]  # the join adds "\n"
