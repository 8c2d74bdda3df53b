"""Benchmarks as their released annotation files lay them out, read into one `Sample` form.

Each loader reads one layout and nothing else; `TASKS` maps a task name to its loader, its
kind (open-ended QA, the five-dimension video-chat benchmark, or audio captioning), the judge
dimensions it is scored on and the question asked where the dataset has none. A record without
an answer (or question) still becomes a Sample, with empty `answers`, so that the evaluation
counts and lists it instead of dropping it silently.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avllm_jax.data import conversation
from avllm_jax.modality import Modality

MEDIA_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".wav", ".flac", ".mp3", ".ogg", ".m4a", ".jpg", ".png")
AVSSD_QUESTION = "What is making the sound in this video?"
CAPTION_QUESTION = "Describe the sound in this audio clip in one sentence."
AVSD_UNDISCLOSED = "__UNDISCLOSED__"  # the AVSD test set hides the answer to each dialog's last turn


@dataclass(frozen=True)
class Sample:
    id: str
    media: tuple[str, ...]  # names to look for under the media root, with or without extension; first found wins
    questions: tuple[str, ...]  # one, or two for the consistency benchmark
    answers: tuple[str, ...]  # reference answers or captions; empty when the annotation has none
    modality: Modality | None = None  # the sample's own (an instruction's modality token); None: the task's


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def _read_json_list(path: Path) -> list[dict]:
    records = _read_json(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a JSON list of objects")
    return records


def _read_csv(path: Path, required: tuple[str, ...] = (), fieldnames: list[str] | None = None) -> list[dict]:
    """Rows of a CSV file with a header line (or with `fieldnames` when it has none)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, fieldnames=fieldnames)
        rows = list(reader)
    if missing := [c for c in required if c not in (reader.fieldnames or [])]:
        raise ValueError(f"{path}: the header lacks column(s) {', '.join(missing)}")
    return rows


def _text(record: dict, *keys: str) -> str:
    """The first of `keys` present in `record`, as stripped text ('' when none is)."""
    for key in keys:
        if record.get(key) is not None:
            return str(record[key]).strip()
    return ""


def _answers(*texts: str) -> tuple[str, ...]:
    return tuple(t for t in texts if t)


def load_msrvtt_qa(path: Path) -> list[Sample]:
    """MSRVTT-QA `test_qa.json`: [{"id", "video_id", "question", "answer"}], video `video<id>.mp4`."""
    samples = []
    for i, r in enumerate(_read_json_list(path)):
        video = _text(r, "video_id")
        stem = f"video{video}" if video.isdigit() else video
        samples.append(Sample(_text(r, "id") or str(i), (stem,), (_text(r, "question"),), _answers(_text(r, "answer"))))
    return samples


def load_msvd_qa(path: Path) -> list[Sample]:
    """MSVD-QA `test_qa.json`: [{"id", "video_id": N, "question", "answer"}].

    Videos carry their YouTube names; `youtube_mapping.txt` beside the annotation file (lines
    "<youtube name> vid<N>") maps N to that name. Without it the video is looked up as `vid<N>`.
    """
    mapping_file = path.parent / "youtube_mapping.txt"
    names = {}
    if mapping_file.exists():
        for line in mapping_file.read_text(encoding="utf-8").splitlines():
            if len(parts := line.split()) == 2:
                names[parts[1]] = parts[0]
    samples = []
    for i, r in enumerate(_read_json_list(path)):
        vid = f"vid{_text(r, 'video_id')}"
        media = (names[vid], vid) if vid in names else (vid,)
        samples.append(Sample(_text(r, "id") or str(i), media, (_text(r, "question"),), _answers(_text(r, "answer"))))
    return samples


def load_activitynet_qa(path: Path) -> list[Sample]:
    """ActivityNet-QA: questions `test_q.json` [{"video_name", "question", "question_id"}] and,
    beside it, answers `test_a.json` [{"question_id", "answer", "type"}]. `--data` names the
    questions file. Questions are stored without '?', which is added."""
    answers_path = path.with_name(path.name.replace("_q.json", "_a.json"))
    if answers_path == path or not answers_path.exists():
        raise ValueError(f"{path}: ActivityNet-QA needs the answers file beside it ({answers_path.name} not found)")
    answer_of = {_text(r, "question_id"): _text(r, "answer") for r in _read_json_list(answers_path)}
    samples = []
    for r in _read_json_list(path):
        name, question = _text(r, "video_name"), _text(r, "question")
        if question and not question.endswith("?"):
            question += "?"
        media = (name,) if name.startswith("v_") else (name, f"v_{name}")
        qid = _text(r, "question_id")
        samples.append(Sample(qid, media, (question,), _answers(answer_of.get(qid, ""))))
    return samples


def load_avsd(path: Path) -> list[Sample]:
    """AVSD (DSTC7) `{"dialogs": [{"image_id", "dialog": [{"question", "answer"}, ...]}]}`.

    Every turn is one question about the Charades video `<image_id>.mp4`, asked without the
    dialog history; a turn whose answer is `__UNDISCLOSED__` counts as having no answer.
    """
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("dialogs"), list):
        raise ValueError(f"{path}: expected an AVSD file with a 'dialogs' list")
    samples = []
    for dialog in data["dialogs"]:
        video = _text(dialog, "image_id")
        for turn, qa in enumerate(dialog.get("dialog") or []):
            answer = _text(qa, "answer")
            answer = "" if answer == AVSD_UNDISCLOSED else answer
            samples.append(Sample(f"{video}_{turn}", (video,), (_text(qa, "question"),), _answers(answer)))
    return samples


_PLACEHOLDER = re.compile(r"<[^<>]+>")


def load_music_avqa(path: Path) -> list[Sample]:
    """MUSIC-AVQA `avqa-test.json`: [{"video_id", "question_id", "question_content", "templ_values",
    "anser"}] (the released files spell it "anser"). The question's `<...>` placeholders are
    filled in order from `templ_values`, a JSON-encoded list."""
    samples = []
    for r in _read_json_list(path):
        values = r.get("templ_values") or "[]"
        try:
            values = json.loads(values) if isinstance(values, str) else values
        except json.JSONDecodeError:
            raise ValueError(
                f"{path}: question {_text(r, 'question_id')}: templ_values {values!r} is not a JSON list"
            ) from None
        fill = iter(values)
        question = _PLACEHOLDER.sub(lambda m: str(next(fill, m.group(0))), _text(r, "question_content"))
        samples.append(
            Sample(_text(r, "question_id"), (_text(r, "video_id"),), (question,), _answers(_text(r, "anser", "answer")))
        )
    return samples


def load_avssd(path: Path) -> list[Sample]:
    """AVSSD, sound-source questions on VGGSound: `vggsound.csv` rows "youtube_id,start,label,split"
    (no header). Rows of the test split (or every row when the split column is absent) become the
    question AVSSD_QUESTION with the label as answer; clips are `<youtube_id>_<start:06d>.mp4`."""
    samples = []
    for r in _read_csv(path, fieldnames=["youtube_id", "start", "label", "split"]):
        split = (r.get("split") or "test").strip()
        if split != "test":
            continue
        video, start = _text(r, "youtube_id"), _text(r, "start")
        media = (f"{video}_{int(start):06d}", f"{video}_{start}", video) if start.isdigit() else (video,)
        samples.append(Sample(f"{video}_{start}", media, (AVSSD_QUESTION,), _answers(_text(r, "label"))))
    return samples


def _load_videochat(path: Path, question_keys: tuple[str, ...]) -> list[Sample]:
    samples = []
    for i, r in enumerate(_read_json_list(path)):
        video = _text(r, "video_name")
        questions = tuple(_text(r, k) for k in question_keys)
        samples.append(Sample(f"{i}_{video}", (video,), questions, _answers(_text(r, "A"))))
    return samples


def load_videochat_qa(path: Path) -> list[Sample]:
    """Video-ChatGPT benchmark `generic_qa.json` / `temporal_qa.json`: [{"video_name", "Q", "A"}]."""
    return _load_videochat(path, ("Q",))


def load_videochat_consistency(path: Path) -> list[Sample]:
    """Video-ChatGPT benchmark `consistency_qa.json`: [{"video_name", "Q1", "Q2", "A"}]; two
    phrasings of one question, both answered."""
    return _load_videochat(path, ("Q1", "Q2"))


def load_clotho(path: Path) -> list[Sample]:
    """Clotho `clotho_captions_evaluation.csv`: header file_name,caption_1..caption_5."""
    samples = []
    for r in _read_csv(path, required=("file_name", "caption_1")):
        name = _text(r, "file_name")
        captions = _answers(*(_text(r, f"caption_{k}") for k in range(1, 6)))
        samples.append(Sample(name, (name,), (CAPTION_QUESTION,), captions))
    return samples


def load_audiocaps(path: Path) -> list[Sample]:
    """AudioCaps `test.csv`: header audiocap_id,youtube_id,start_time,caption, one row per caption
    (five per clip). Clips are looked up as `<youtube_id>`, `Y<youtube_id>` or `<youtube_id>_<start>`."""
    clips: dict[str, tuple[str, list[str]]] = {}
    for r in _read_csv(path, required=("youtube_id", "start_time", "caption")):
        video = _text(r, "youtube_id")
        start, captions = clips.setdefault(video, (_text(r, "start_time"), []))
        if caption := _text(r, "caption"):
            captions.append(caption)
    return [
        Sample(video, (video, f"Y{video}", f"{video}_{start}"), (CAPTION_QUESTION,), tuple(captions))
        for video, (start, captions) in clips.items()
    ]


def load_instructions(path: Path) -> list[Sample]:
    """The project's own instruction format (docs/data.md; what training reads): a `.jsonl` file,
    or a LLaVA/Valley `.json` array. Each sample's first exchange is the question, without its
    modality token, and the reference answer; the token's modality is the one the question is
    asked with. Media paths are relative to the file's directory, as in training (evaluate's
    --media-root defaults to it); a malformed line is an error naming `file:line`. Later turns
    of a multi-turn sample are not asked (they lean on the history); text-only samples have no
    media and are counted as missing it."""
    records, _ = conversation.read_samples(path)
    samples = []
    for record in records:
        question = record.turns[0][1]
        if record.modality is not None:
            question = question.replace(record.modality.token, "", 1)
        media = () if record.media_path is None else (os.path.relpath(record.media_path, path.parent),)
        samples.append(
            Sample(record.id, media, (question.strip(),), _answers(record.turns[1][1].strip()), record.modality)
        )
    return samples


QA_DIMENSIONS = ("qa",)
VIDEOCHAT_QA_DIMENSIONS = ("correctness", "detail", "context")


@dataclass(frozen=True)
class Task:
    load: Callable[[Path], list[Sample]]
    kind: str  # "qa" (judge + exact match), "videochat" (judge only) or "caption" (CIDEr-D, SPIDEr)
    judge_dimensions: tuple[str, ...]
    modality: str | None = None  # None: whatever streams each media file has


TASKS = {
    "msrvtt_qa": Task(load_msrvtt_qa, "qa", QA_DIMENSIONS),
    "msvd_qa": Task(load_msvd_qa, "qa", QA_DIMENSIONS),
    "activitynet_qa": Task(load_activitynet_qa, "qa", QA_DIMENSIONS),
    "avsd": Task(load_avsd, "qa", QA_DIMENSIONS),
    "music_avqa": Task(load_music_avqa, "qa", QA_DIMENSIONS),
    "avssd": Task(load_avssd, "qa", QA_DIMENSIONS),
    # The five dimensions of the video-chat benchmark come from three annotation files.
    "videochat_generic": Task(load_videochat_qa, "videochat", VIDEOCHAT_QA_DIMENSIONS),
    "videochat_temporal": Task(load_videochat_qa, "videochat", ("temporal",)),
    "videochat_consistency": Task(load_videochat_consistency, "videochat", ("consistency",)),
    "jsonl": Task(load_instructions, "qa", QA_DIMENSIONS),  # held-out data in the training format
    "clotho": Task(load_clotho, "caption", (), modality="audio"),
    "audiocaps": Task(load_audiocaps, "caption", (), modality="audio"),
}


def load_task(name: str, path: str | os.PathLike) -> list[Sample]:
    """The samples of benchmark `name` read from annotation file `path`; ids checked unique."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")
    samples = TASKS[name].load(path)
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise ValueError(f"{path}: question id {s.id!r} appears more than once")
        seen.add(s.id)
    return samples


def index_media(root: str | os.PathLike[str]) -> dict[str, str]:
    """Every media file under `root` (by extension), findable by its path relative to root, its
    name, or either without extension; the first in sorted order wins a clash."""
    found: dict[str, str] = {}
    for directory, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in MEDIA_EXTENSIONS:
                continue
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root)
            for key in (relative, name, os.path.splitext(relative)[0], os.path.splitext(name)[0]):
                found.setdefault(key, full)
    return found


def resolve_media(sample: Sample, media_index: dict[str, str]) -> str | None:
    """The media file of `sample`: the first of its names found in the index, or None."""
    return next((media_index[name] for name in sample.media if name in media_index), None)
