"""Instruction samples: reading our JSONL, LLaVA and Valley files; the Vicuna v1.1 template; labels."""

import json
import re

import numpy as np
import pytest

from avllm_jax.data import conversation as conv
from avllm_jax.modality import IGNORE_INDEX, Modality


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = conv.train_tokenizer([conv.SYSTEM_PROMPT, "USER: ASSISTANT: What colour is the shape? red circle"], 400)
    conv.add_modality_tokens(tokenizer)
    return tokenizer


TURNS = [
    ("USER", "<AUD_VIS>\nWhat colour is the shape?"),
    ("ASSISTANT", "red"),
    ("USER", "And its shape?"),
    ("ASSISTANT", "a big circle"),
]


def test_vicuna_v11_layout():
    text, spans = conv.render_prompt(TURNS)
    assert text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <AUD_VIS>\nWhat colour is the shape? "
        "ASSISTANT: red</s>USER: And its shape? ASSISTANT: a big circle</s>"
    )
    assert [text[a:b] for a, b in spans] == [" red</s>", " a big circle</s>"]
    prompt, no_spans = conv.render_prompt(TURNS[:1])
    assert prompt.endswith("What colour is the shape? ASSISTANT:") and no_spans == []


def label_runs(labels):
    """Contiguous runs of labelled positions, as lists of indices."""
    runs, current = [], []
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_labels_cover_exactly_the_answers_and_their_eos(tokenizer):
    ids, labels = conv.tokenize_turns(TURNS, tokenizer)
    assert ids.dtype == labels.dtype == np.int32
    labelled = labels != IGNORE_INDEX
    assert (labels[labelled] == ids[labelled]).all()
    runs = label_runs(labels)
    decoded = [tokenizer.decode(ids[run], skip_special_tokens=False).strip() for run in runs]
    assert decoded == ["red</s>", "a big circle</s>"]
    # Everything outside the runs is prompt: the system prompt, both questions, the role names.
    prompt_text = tokenizer.decode(ids[~labelled], skip_special_tokens=False)
    assert "USER" in prompt_text and "And its shape?" in prompt_text and "red" not in prompt_text


def test_generation_prompt_is_a_prefix_of_the_training_ids(tokenizer):
    ids, labels = conv.tokenize_turns(TURNS, tokenizer)
    prompt_ids = tokenizer(conv.render_prompt(TURNS[:1])[0])["input_ids"]
    assert ids[: len(prompt_ids)].tolist() == prompt_ids
    assert labels[len(prompt_ids)] != IGNORE_INDEX and (labels[: len(prompt_ids)] == IGNORE_INDEX).all()


def test_truncation_keeps_the_modality_token(tokenizer):
    ids, labels = conv.tokenize_turns(TURNS, tokenizer)
    vis_id = tokenizer.convert_tokens_to_ids(Modality.AUDIO_VISUAL.token)
    position = int(np.flatnonzero(ids == vis_id)[0])
    short_ids, short_labels = conv.tokenize_turns(TURNS, tokenizer, max_length=position + 3)
    assert (
        short_ids.tolist() == ids[: position + 3].tolist() and short_labels.tolist() == labels[: position + 3].tolist()
    )
    assert vis_id in short_ids
    with pytest.raises(ValueError, match="modality token"):
        conv.tokenize_turns(TURNS, tokenizer, max_length=position)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def record(media="clip.mp4", key="video", modality="visual", prompt="<VIS>\nWhat is it?", answer="a dog"):
    out = {
        "id": "x",
        key: media,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
    }
    if modality:
        out["modality"] = modality
    return out


def test_reads_our_jsonl_with_every_modality(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            record(),
            record(key="audio", media="a.wav", modality="audio", prompt="<AUD>\nWhat sound?"),
            record(modality="audio_visual", prompt="What makes the sound?\n<AUD_VIS>"),
            {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        ],
    )
    samples, malformed = conv.read_samples(path)
    assert malformed == []
    assert [s.modality for s in samples] == ["visual", "audio", "audio_visual", None]
    assert samples[0].media_path == str(tmp_path / "clip.mp4") and samples[3].media_path is None
    assert samples[1].turns == [("USER", "<AUD>\nWhat sound?"), ("ASSISTANT", "a dog")]
    assert samples[2].origin == f"{path}:3"


def test_reads_llava_and_valley_json(tmp_path):
    llava = [
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi!"}]},
    ]
    valley = [
        {
            "id": "v_1",
            "video": "webvid/1066692580.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nDescribe the video."},
                {"from": "gpt", "value": "A cat sleeps."},
            ],
        }
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "valley.json").write_text(json.dumps(valley))
    samples, _ = conv.read_samples(tmp_path / "llava.json", media_root="/data/images")
    assert samples[0].media_path == "/data/images/coco/train2017/000000033471.jpg"
    assert samples[0].modality == "visual" and samples[0].turns[0][1].endswith("\n<VIS>") and len(samples[0].turns) == 4
    assert samples[1].modality is None
    (video,), _ = conv.read_samples(tmp_path / "valley.json")
    assert (
        video.modality == "visual"
        and video.turns[0][1].startswith("<VIS>\n")
        and video.origin.endswith("valley.json[0]")
    )


MALFORMED = {
    "not json": "{not json",
    "no conversations": {"id": "a", "video": "v.mp4"},
    "two tokens": record(prompt="<VIS> and <AUD>"),
    "no token": record(prompt="What is it?"),
    "token in an answer": record(answer="<VIS>"),
    "modality mismatch": record(modality="audio"),
    "roles out of order": {
        "video": "v.mp4",
        "conversations": [{"from": "gpt", "value": "<VIS>"}, {"from": "human", "value": "x"}],
    },
    "audio token on an image": record(key="image", media="i.jpg", modality=None, prompt="<AUD>\nWhat?"),
    "unknown modality": record(modality="smell"),
    "media path not a string": record(media=5),
    "conversations not a list": {"video": "v.mp4", "conversations": "<VIS>\nWhat is it? A dog."},
    "a turn's value not a string": {
        "video": "v.mp4",
        "conversations": [{"from": "human", "value": "<VIS>"}, {"from": "gpt", "value": 3}],
    },
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_line_names_file_and_line(tmp_path, name):
    path = write_jsonl(tmp_path / "bad.jsonl", [record(), MALFORMED[name]])
    with pytest.raises(conv.MalformedSampleError, match="bad.jsonl:2: "):
        conv.read_samples(path)


@pytest.mark.parametrize("media", ["../secret/clip.mp4", "/etc/clip.mp4", "a/../../clip.mp4"])
def test_a_path_outside_a_given_media_root_names_both(tmp_path, media):
    root = tmp_path / "media"
    path = write_jsonl(tmp_path / "bad.jsonl", [record(), record(media=media)])
    with pytest.raises(
        conv.MalformedSampleError,
        match=rf"bad.jsonl:2: media path '{re.escape(media)}' lies outside media_root {re.escape(str(root))}",
    ):
        conv.read_samples(path, media_root=root)


def test_paths_that_stay_inside_or_are_relative_to_the_file_are_kept(tmp_path):
    root = tmp_path / "media"
    assert conv.read_samples(write_jsonl(tmp_path / "in.jsonl", [record(media="a/../b.mp4")]), media_root=root)[0][
        0
    ].media_path == str(root / "a/../b.mp4")
    assert (
        conv.read_samples(write_jsonl(tmp_path / "abs.jsonl", [record(media="/etc/clip.mp4")]), media_root="/")[0][
            0
        ].media_path
        == "/etc/clip.mp4"
    )
    # Without media_root, paths are relative to the file and may go up (a curated file beside its videos' directory).
    assert conv.read_samples(write_jsonl(tmp_path / "up.jsonl", [record(media="../videos/c.mp4")]))[0][
        0
    ].media_path == str(tmp_path / "../videos/c.mp4")


def test_malformed_lines_are_skipped_and_counted_when_asked(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [record(), *MALFORMED.values(), record()])
    samples, malformed = conv.read_samples(path, skip_malformed=True)
    assert len(samples) == 2 and len(malformed) == len(MALFORMED)
    assert [str(e).split(": ")[0].rsplit(":", 1)[1] for e in malformed] == [
        str(i) for i in range(2, 2 + len(MALFORMED))
    ]


def test_with_modality_rewrites_the_token():
    turns = conv.with_modality(TURNS, "audio")
    assert turns[0][1] == "<AUD>\nWhat colour is the shape?" and turns[1:] == TURNS[1:]
