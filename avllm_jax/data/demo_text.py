"""The demo's text beyond its questions, in one set of words: the stand-in's lessons (text
alone, before stage 1) and stage 1's captions of a clip.

The stand-in for Vicuna: what a pretrained LLM brings to the paper's recipe, taught to the
demo's tiny LLM before stage 1, in plain words.

The paper starts from Vicuna, which already reads a sequence by position (the first, the last,
the n-th item, what comes after an item), lines up two sequences of events, counts, and names
colours, shapes, places and pitches. A lesson is one short text (`draw_lesson`) and three
questions about it, each answered from that text alone:

- a list of words of one kind ("colours: red, blue, blue, green"): its first, last or n-th
  item, the item right after or before one that occurs once, how often a word occurs, how many
  items there are, or the list repeated;
- a shape and its steps, each a colour and a place ("square; steps: red far left, red far
  left, green left"): the shape, the first or last colour or place, the colour at step n,
  which way the places go;
- the same beside a list of sounds, one per step, of one pitch ("sounds (low): quiet, beep,
  beep"): the colour or the place at the first beep, how many beeps, the pitch;
- a list of sounds alone: how many beeps, the pitch.

Every lesson but a plain list can also be asked to be described: the answer restates it in one
line, in the words stage 1's captions use for a clip (`caption`), so that the stand-in can
already say what stage 1 teaches the projectors to show it.

Stage 1 (the paper's pretraining, on captions): `make_caption_split` asks about each training
clip "Describe the video." (or the sound, or both) and answers with `caption`, the clip as a
lesson described: its shape, each segment's colour and place, each segment's sound.

The words are the demo's (avllm_jax/data/synthetic.py) plus a few more colours and shapes, so
that a stand-in knows more names than the clips show. A sample is a text-only conversation
(no media, no modality token) with its lesson kept for checking ("lesson").
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from avllm_jax.data import conversation, synthetic
from avllm_jax.modality import Modality

COLOURS = tuple(synthetic.STILL_COLOURS)
SHAPES = (*synthetic.SHAPES, "star", "ring")
PLACES = synthetic.STOPS
PITCHES = tuple(synthetic.PITCHES)
SOUNDS = ("quiet", "beep")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
KINDS = {"colours": ("colour", COLOURS), "shapes": ("shape", SHAPES), "places": ("place", PLACES)}
MIN_ITEMS, MAX_ITEMS = 3, 6

# Question templates per question type; {noun} is the list's kind, {n} an ordinal, {word} an item.
LIST_QUESTIONS = {
    "first item": ("What is the first {noun}?", "Which {noun} comes first?", "Name the {noun} at the start."),
    "last item": ("What is the last {noun}?", "Which {noun} comes last?", "Name the {noun} at the end."),
    "nth item": ("What is the {n} {noun}?", "Which {noun} is {n} in the list?"),
    "after": ("Which {noun} comes right after {word}?", "What follows {word}?"),
    "before": ("Which {noun} comes right before {word}?", "What comes just before {word}?"),
    "count word": ("How many times does {word} occur?", "Count the times {word} is listed."),
    "length": ("How many {noun}s are listed?", "How long is the list?"),
    "repeat": ("Repeat the list.", "Say the {noun}s in order."),
}
DESCRIBE = {"describe": ("Describe it.", "Say what happens.")}
STEP_QUESTIONS = {
    "shape": ("What is the shape?", "Which shape is it?"),
    "first colour": ("What colour is it at the first step?", "Which colour does it start with?"),
    "last colour": ("What colour is it at the last step?", "Which colour does it end with?"),
    "first place": ("Where is it at the first step?", "Where does it start?"),
    "last place": ("Where is it at the last step?", "Where does it end?"),
    "nth colour": ("What colour is it at the {n} step?",),
    "direction": ("Does it go left or right?", "Which way does it go?"),
}
SOUND_QUESTIONS = {
    "colour at first beep": ("What colour is it at the first beep?", "Which colour does it have when the beeps begin?"),
    "place at first beep": ("Where is it at the first beep?", "Where is it when the beeps begin?"),
    "beeps": ("How many beeps sound?", "Count the beeps."),
    "pitch": ("Is the sound high or low?", "What pitch do the beeps have?"),
    "repeat sounds": ("Repeat the sounds.",),
}
BEEP_QUESTIONS = ("beeps", "pitch", "repeat sounds")
QUESTIONS = {
    "list": LIST_QUESTIONS,
    "steps": {**STEP_QUESTIONS, **DESCRIBE},
    "steps and sounds": {**STEP_QUESTIONS, **SOUND_QUESTIONS, **DESCRIBE},
    "sounds": {**{t: SOUND_QUESTIONS[t] for t in BEEP_QUESTIONS}, **DESCRIBE},
}
KINDS_DRAWN = tuple(QUESTIONS)
TURNS = 3


def draw_lesson(rng: np.random.Generator) -> dict:
    """One lesson: {"kind", the lists it shows, "questions": [[type, question, answer], ...]}."""
    kind = KINDS_DRAWN[rng.integers(len(KINDS_DRAWN))]
    n = int(rng.integers(MIN_ITEMS, MAX_ITEMS + 1))
    lesson: dict[str, Any]
    if kind == "list":
        name = tuple(KINDS)[rng.integers(len(KINDS))]
        words = KINDS[name][1]
        lesson = {"kind": kind, "name": name, "items": [str(words[i]) for i in rng.integers(len(words), size=n)]}
    else:
        lesson = {"kind": kind}
        if kind != "sounds":
            lesson.update(shape=str(SHAPES[rng.integers(len(SHAPES))]), **_draw_steps(rng, n))
        if kind != "steps":
            onset = int(rng.integers(n))
            beeps = [k == onset or (k > onset and rng.random() < 0.4) for k in range(n)]
            lesson.update(pitch=str(PITCHES[rng.integers(len(PITCHES))]), sounds=[SOUNDS[b] for b in beeps])
    types = [t for t in QUESTIONS[kind] if _askable(t, lesson)]
    lesson["questions"] = [_ask(str(t), lesson, rng) for t in rng.permutation(types)[:TURNS]]
    return lesson


def _draw_steps(rng: np.random.Generator, n: int) -> dict:
    """A thing that changes colour once and moves one place left or right once, as a demo clip does."""
    colour_change, place_change = (int(c) for c in rng.integers(1, n, size=2))
    before, after = (str(COLOURS[i]) for i in rng.choice(len(COLOURS), size=2, replace=False))
    step = 1 if rng.random() < 0.5 else -1
    start = int(rng.integers(0, len(PLACES) - 1)) + (step < 0)
    return {
        "colours": [before if k < colour_change else after for k in range(n)],
        "places": [PLACES[start + step * (k >= place_change)] for k in range(n)],
    }


def _askable(question_type: str, lesson: dict) -> bool:
    if question_type in ("after", "before"):
        return bool(_unique_words(lesson, question_type))
    return True


def _unique_words(lesson: dict, question_type: str) -> list[str]:
    """The items that occur once and have a neighbour on the asked side."""
    items = lesson["items"]
    inner = items[:-1] if question_type == "after" else items[1:]
    return [w for w in inner if items.count(w) == 1]


def _ask(question_type: str, lesson: dict, rng: np.random.Generator) -> list[str]:
    """[type, question, answer], the answer computed from the lesson's lists."""
    template = str(rng.choice(QUESTIONS[lesson["kind"]][question_type]))
    fields = {"noun": KINDS[lesson["name"]][0] if lesson["kind"] == "list" else ""}
    length = len(lesson.get("items") or lesson.get("colours") or lesson["sounds"])
    index = int(rng.integers(length))
    fields["n"] = ORDINALS[index]
    if question_type in ("after", "before"):
        fields["word"] = str(rng.choice(_unique_words(lesson, question_type)))
    elif question_type == "count word":
        fields["word"] = str(rng.choice(lesson["items"]))
    return [question_type, template.format(**fields), answer(question_type, lesson, **fields)]


def answer(question_type: str, lesson: dict, *, n: str = "first", word: str = "", noun: str = "") -> str:
    """The answer to a question of `question_type` about the lesson's lists."""
    del noun  # in the question only
    items, colours, places = (lesson.get(key, []) for key in ("items", "colours", "places"))
    beeps = [s == "beep" for s in lesson.get("sounds", ())]
    if question_type == "first item":
        return items[0]
    if question_type == "last item":
        return items[-1]
    if question_type == "nth item":
        return items[ORDINALS.index(n)]
    if question_type in ("after", "before"):
        return items[items.index(word) + (1 if question_type == "after" else -1)]
    if question_type == "count word":
        return NUMBERS[items.count(word)]
    if question_type == "length":
        return NUMBERS[len(items)]
    if question_type == "repeat":
        return ", ".join(items)
    if question_type == "describe":
        return "; ".join(_lines(lesson))
    if question_type == "shape":
        return lesson["shape"]
    if question_type in ("first colour", "last colour", "first place", "last place"):
        which, what = question_type.split()
        return {"colour": colours, "place": places}[what][0 if which == "first" else -1]
    if question_type == "nth colour":
        return colours[ORDINALS.index(n)]
    if question_type == "direction":
        return "right" if PLACES.index(places[-1]) > PLACES.index(places[0]) else "left"
    if question_type == "colour at first beep":
        return colours[beeps.index(True)]
    if question_type == "place at first beep":
        return places[beeps.index(True)]
    if question_type == "beeps":
        return NUMBERS[sum(beeps)]
    if question_type == "pitch":
        return lesson["pitch"]
    if question_type == "repeat sounds":
        return ", ".join(lesson["sounds"])
    raise ValueError(f"no question type {question_type!r}")


def lesson_text(lesson: dict) -> str:
    """The lesson's lists as the user writes them, one a line."""
    if lesson["kind"] == "list":
        return f"{lesson['name']}: " + ", ".join(lesson["items"])
    return "\n".join(_lines(lesson))


def _lines(lesson: dict) -> list[str]:
    """A shape, steps, sounds lesson's lines: "square", "steps: red far left, ...", "sounds (low): quiet, ..."."""
    lines = []
    if "shape" in lesson:
        lines += [lesson["shape"], "steps: " + ", ".join(_steps(lesson))]
    if "sounds" in lesson:
        lines.append(f"sounds ({lesson['pitch']}): " + ", ".join(lesson["sounds"]))
    return lines


def _steps(lesson: dict) -> list[str]:
    """A shape lesson's steps, each its colour and place: "red far left"."""
    return [f"{c} {p}" for c, p in zip(lesson["colours"], lesson["places"], strict=True)]


def make_lessons(path: str | os.PathLike, num_samples: int, seed: int) -> pathlib.Path:
    """Writes `num_samples` text-only samples (three questions about one lesson each) to the JSONL `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(path, "w") as out:
        for index in range(num_samples):
            lesson = draw_lesson(rng)
            conversations = []
            for i, (_, question, reply) in enumerate(lesson["questions"]):
                text = f"{lesson_text(lesson)}\n{question}" if i == 0 else question
                conversations += [{"from": "human", "value": text}, {"from": "gpt", "value": reply}]
            out.write(
                json.dumps({"id": f"lesson_{index:06d}", "conversations": conversations, "lesson": lesson}) + "\n"
            )
    return path


def tokenizer_corpus() -> list[str]:
    """The lessons' words and question templates, for the demo's tokenizer."""
    templates = [q for table in QUESTIONS.values() for qs in table.values() for q in qs]
    words = [*COLOURS, *SHAPES, *PLACES, *PITCHES, *SOUNDS, *NUMBERS, *ORDINALS, *KINDS, "steps", "sounds"]
    return [*templates, " ".join(words), ", ".join(words)]


# Stage 1's requests for a caption, per stream the file has.
CAPTION_REQUESTS = {
    Modality.VISUAL: ("Describe the video.", "What happens in the video?"),
    Modality.AUDIO: ("Describe the sound.", "What do you hear?"),
    Modality.AUDIO_VISUAL: ("Describe the video and its sound.", "What do you see and hear?"),
}


def caption(timeline: dict) -> str:
    """The clip of `timeline` (synthetic.draw_timeline's) in words, segment by segment, as its
    lesson is described: "square; steps: red far left, ...; sounds (low): quiet, beep, ..."."""
    return "; ".join(_lines(_clip_lesson(timeline)))


def _clip_lesson(timeline: dict) -> dict[str, Any]:
    """The clip of `timeline` as a shape, steps, sounds lesson's lists (no questions)."""
    lesson: dict[str, Any] = {}
    if "shape" in timeline:
        places = [PLACES[s] for s in timeline["stops"]]
        lesson.update(shape=timeline["shape"], colours=timeline["colours"], places=places)
    if "pitch" in timeline:
        lesson.update(pitch=timeline["pitch"], sounds=[SOUNDS[b] for b in timeline["beeps"]])
    return lesson


def row_words(timeline: dict) -> dict[str, list[str]]:
    """The words of the caption that each of the clip's media rows stands for, per projector:
    "temporal_proj", one per frame (its segment's colour and place, "red far left");
    "spatial_proj", the shape (the same for each of the time-pooled patch rows); "audio_proj",
    one per audio segment (the pitch and its sound, "low beep"). Stage 1's start is fitted to
    them (tools/demo.py, align_projectors)."""
    lesson, words = _clip_lesson(timeline), {}
    if "shape" in lesson:
        words["temporal_proj"], words["spatial_proj"] = _steps(lesson), [lesson["shape"]]
    if "sounds" in lesson:
        words["audio_proj"] = [f"{lesson['pitch']} {sound}" for sound in lesson["sounds"]]
    return words


def make_caption_split(data_dir: str | os.PathLike, split: str = "train", seed: int = 0) -> pathlib.Path:
    """data_dir/{split}_captions.jsonl: one caption sample per clip of data_dir/{split}.jsonl (the
    same media), asking about every stream the file has."""
    data_dir = pathlib.Path(data_dir)
    rng = np.random.default_rng(seed)
    path = data_dir / f"{split}_captions.jsonl"
    with open(data_dir / f"{split}.jsonl") as source, open(path, "w") as out:
        for line in source:
            record = json.loads(line)
            kind = Modality.from_flags("shape" in record["timeline"], "pitch" in record["timeline"])
            if kind is None:
                raise ValueError(f"{source.name}: sample {record['id']!r} has a timeline of neither stream")
            request = conversation.first_user_message(str(rng.choice(CAPTION_REQUESTS[kind])), kind)
            sample = {key: record[key] for key in ("id", "video", "audio", "timeline") if key in record}
            sample |= {
                "modality": kind.value,
                "conversations": [
                    {"from": "human", "value": request},
                    {"from": "gpt", "value": caption(record["timeline"])},
                ],
            }
            out.write(json.dumps(sample) + "\n")
    return path
