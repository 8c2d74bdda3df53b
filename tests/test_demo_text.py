"""The stand-in's text lessons: every answer is read back off the text the question is about,
by a parser written here, independently of how the lesson was drawn; and stage 1's captions
say each clip segment by segment."""

import json
import re

import numpy as np
import pytest

from avllm_jax.data import conversation as conv
from avllm_jax.data import demo_text, synthetic

ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]
PLACES = ["far left", "left", "right", "far right"]


def parse(text: str) -> dict:
    """What a lesson's text shows: {"items"}, or any of {"shape", "colours", "places"} and {"pitch", "sounds"}."""
    lists = {"lines": text.split("\n")}
    for line in lists["lines"]:
        head, _, body = line.partition(": ")
        entries = body.split(", ")
        if not body:
            lists["shape"] = head
        elif head == "steps":
            splits = [e.split(" ", 1) for e in entries]
            lists["colours"], lists["places"] = [s[0] for s in splits], [s[1] for s in splits]
        elif head.startswith("sounds ("):
            lists["pitch"], lists["sounds"] = head[len("sounds (") : -1], entries
        else:
            lists["items"] = entries
    return lists


def expected(question: str, lists: dict) -> str:
    """The answer to `question`, from the question's words and the parsed lists alone."""
    q = question.rstrip("?.").split()
    items, colours, places = lists.get("items"), lists.get("colours"), lists.get("places")
    first_beep = lists["sounds"].index("beep") if "sounds" in lists else None
    ordinal = next((ORDINALS.index(w) for w in q if w in ORDINALS), None)
    # The item asked about ("far left" is one): after these words, up to the end of the question.
    found = re.search(r".*(?:after|follows|before|does|times) (.+?)(?: occur| is listed)?[?.]$", question)
    word = found.group(1) if found else None
    if items is not None:
        if question.startswith(("Repeat", "Say the")):
            return ", ".join(items)
        if "How long" in question or ("How many" in question and "times" not in question):
            return NUMBERS[len(items)]
        if "times" in question:
            return NUMBERS[items.count(word)]
        if "after" in question or "follows" in question:
            return items[items.index(word) + 1]
        if "before" in question:
            return items[items.index(word) - 1]
        if "start" in q or "comes first" in question:
            return items[0]
        if "end" in q or "last" in q:
            return items[-1]
        return items[ordinal]
    if question in ("Describe it.", "Say what happens."):
        return "; ".join(lists["lines"])
    if question in ("What is the shape?", "Which shape is it?"):
        return lists["shape"]
    if "Repeat the sounds" in question:
        return ", ".join(lists["sounds"])
    if "pitch" in q or "high or low" in question:
        return lists["pitch"]
    if "beep" in question or "beeps begin" in question:
        if "How many" in question or "Count" in question:
            return NUMBERS[lists["sounds"].count("beep")]
        return (colours if "colour" in q else places)[first_beep]
    if "left or right" in question or "Which way" in question:
        return "right" if PLACES.index(places[-1]) > PLACES.index(places[0]) else "left"
    sequence = colours if "colour" in q else places
    if "last" in q or "end" in q:
        return sequence[-1]
    if "start" in q or ordinal == 0:
        return sequence[0]
    return sequence[ordinal]


@pytest.fixture(scope="module")
def lessons(tmp_path_factory):
    path = demo_text.make_lessons(tmp_path_factory.mktemp("lessons") / "lessons.jsonl", 600, seed=5)
    samples, malformed = conv.read_samples(path)
    assert malformed == [] and len(samples) == 600
    return samples


def test_every_answer_is_read_back_off_the_lesson_text(lessons):
    asked = set()
    for sample in lessons:
        assert sample.modality is None and sample.media_path is None  # text alone
        lesson_text, _, first_question = sample.turns[0][1].rpartition("\n")
        lists = parse(lesson_text)
        questions = [first_question] + [text for role, text in sample.turns[2::2]]
        answers = [text for role, text in sample.turns[1::2]]
        assert len(questions) == len(answers) == demo_text.TURNS
        for question, reply in zip(questions, answers, strict=True):
            assert reply == expected(question, lists), (sample.turns[0][1], question)
            asked.add(question)
    # Every template of every kind came up in 600 lessons.
    templates = {t for table in demo_text.QUESTIONS.values() for qs in table.values() for t in qs}
    assert len(asked) > len(templates)


def test_lessons_ask_every_skill_and_lists_of_every_length(lessons):
    lengths, kinds = set(), set()
    for sample in lessons:
        lists = parse(sample.turns[0][1].rpartition("\n")[0])
        lengths.add(len(lists.get("items") or lists.get("colours") or lists["sounds"]))
        kinds.add(tuple(sorted(set(lists) - {"lines"})))
    assert lengths == set(range(demo_text.MIN_ITEMS, demo_text.MAX_ITEMS + 1))
    assert kinds == {
        ("items",),
        ("colours", "places", "shape"),
        ("colours", "pitch", "places", "shape", "sounds"),
        ("pitch", "sounds"),
    }


def test_a_described_lesson_is_said_as_stage_1_captions_a_clip():
    """Describing a shape-and-steps lesson gives the words demo_text.caption gives the same clip."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        lesson = demo_text.draw_lesson(rng)
        if lesson["kind"] == "steps and sounds" and len(lesson["colours"]) == synthetic.NUM_SEGMENTS:
            timeline = {
                "shape": lesson["shape"],
                "colours": lesson["colours"],
                "stops": [PLACES.index(p) for p in lesson["places"]],
                "pitch": lesson["pitch"],
                "beeps": [s == "beep" for s in lesson["sounds"]],
            }
            assert demo_text.answer("describe", lesson) == demo_text.caption(timeline)
            return
    raise AssertionError("no four-step lesson with sounds in 50")


def test_a_caption_names_each_segment_in_order():
    timeline = {
        "shape": "triangle",
        "direction": "right",
        "colours": ["blue", "blue", "red", "red"],
        "stops": [0, 0, 1, 1],
        "pitch": "low",
        "beeps": [False, True, True, False],
    }
    assert demo_text.caption(timeline) == (
        "triangle; steps: blue far left, blue far left, red left, red left; sounds (low): quiet, beep, beep, quiet"
    )
    played_back = demo_text.caption(synthetic.reversed_timeline(timeline))
    assert played_back.startswith("triangle; steps: red left, red left, blue far left")


def test_caption_split_has_one_caption_per_clip_about_every_stream(tmp_path):
    synthetic.make_demo_split(tmp_path, "train", 12, seed=2, turns_per_sample=3)
    path = demo_text.make_caption_split(tmp_path, "train")
    captions, malformed = conv.read_samples(path)
    assert malformed == [] and len(captions) == 12
    for caption, line in zip(captions, path.read_text().splitlines(), strict=True):
        timeline = json.loads(line)["timeline"]
        assert caption.modality.has_visual == ("shape" in timeline)
        assert caption.modality.has_audio == ("pitch" in timeline)
        words = caption.turns[-1][1]
        if "shape" in timeline:  # the colours, in order, as the caption says them
            steps = words.split("steps: ")[1].split(";")[0].split(", ")
            assert [s.split(" ", 1)[0] for s in steps] == timeline["colours"]
            assert [PLACES.index(s.split(" ", 1)[1]) for s in steps] == timeline["stops"]
        if "pitch" in timeline:
            assert words.rsplit(": ", 1)[1].split(", ") == ["beep" if b else "quiet" for b in timeline["beeps"]]


def test_each_media_row_stands_for_the_words_its_segment_has_in_the_caption():
    """demo_text.row_words, read back off the clip's caption with this file's parser: frame k
    is step k's colour and place, every patch row the shape, audio segment k the pitch and
    segment k's sound."""
    rng = np.random.default_rng(0)
    for visual, audio in [(True, False), (False, True), (True, True)] * 20:
        timeline = synthetic.draw_timeline(rng, visual=visual, audio=audio)
        rows = demo_text.row_words(timeline)
        lists = parse(demo_text.caption(timeline).replace("; ", "\n"))
        if "shape" in timeline:
            steps = [f"{c} {p}" for c, p in zip(lists["colours"], lists["places"], strict=True)]
            assert rows["temporal_proj"] == steps and len(steps) == synthetic.NUM_SEGMENTS
            assert rows["spatial_proj"] == [lists["shape"]]
        else:
            assert "temporal_proj" not in rows and "spatial_proj" not in rows
        if "pitch" in timeline:
            assert rows["audio_proj"] == [f"{lists['pitch']} {s}" for s in lists["sounds"]]
        else:
            assert "audio_proj" not in rows
