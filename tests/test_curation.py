"""Instruction curation against a fake OpenAI-compatible server: parsing, rules, resume, format."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from test_client import FakeServer  # the scripted server of the client tests

from avllm_jax.curation.client import ChatClient
from avllm_jax.curation.instructions import (
    TASKS,
    Rejected,
    build_messages,
    curate,
    join_captions,
    load_rules,
    load_template,
    parse_description,
    parse_qa_pairs,
    read_finished,
    reply_to_sample,
    summary_table,
)
from avllm_jax.data.conversation import read_samples
from avllm_jax.modality import MODALITY_TOKENS, Modality

_cli_spec = importlib.util.spec_from_file_location(
    "curate_instructions", Path(__file__).parents[1] / "tools" / "curate_instructions.py"
)
curate_cli = importlib.util.module_from_spec(_cli_spec)
_cli_spec.loader.exec_module(curate_cli)

GOOD_QA = """Sure, here is the conversation:
Question: What is the dog doing?
Answer: The dog is running along the beach.
**Question 2:** Where is it?
**Answer 2:** On a sandy beach
next to the sea.
"""
GOOD_DESCRIPTION = (
    "Detailed description: A brown dog runs across a sandy beach next to the sea, "
    "kicking up sand as it goes, while waves roll in behind it."
)
# What the fake LLM answers, by the marker word in the context's captions.
REPLIES = {
    "good": {"conversation": GOOD_QA, "reasoning": GOOD_QA, "description": GOOD_DESCRIPTION},
    "according": {
        "conversation": "Question: What is shown?\nAnswer: According to the description, a dog.\n" * 2,
        "reasoning": "Question: Why?\nAnswer: Based on the captions, it plays.",
        "description": "Description: According to the description, " + GOOD_DESCRIPTION.split(": ", 1)[1],
    },
    "prose": {t: "I am not able to help with that." for t in TASKS},
    "unanswered": {t: "Question: What is shown?\nQuestion: Where?\nAnswer: A beach." for t in TASKS},
}


def fake_llm(prompt: str) -> str:
    context = prompt.split("CONTEXT", 1)[1]
    marker = next(m for m in REPLIES if m in context)
    task = (
        "description" if "detailed description" in prompt else "reasoning" if "reasoning" in prompt else "conversation"
    )
    return REPLIES[marker][task]


def write_contexts(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def context(cid, marker, media="video"):
    record = {"id": cid, media: f"/data/{cid}.mp4", "visual_captions": [f"a dog on a beach {cid} {marker}"] * 2}
    if media != "image":
        record["audio_captions"] = [f"waves crashing {cid} {marker}"]
    return record


@pytest.fixture
def server():
    fake = FakeServer(default=fake_llm)
    yield fake
    fake.close()


def client_for(server):
    return ChatClient(server.endpoint, "fake", "sk-secret", max_concurrency=4, max_retries=1, initial_backoff_s=0)


# ---- templates ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("modality", list(Modality))
def test_templates_have_four_sections_and_the_right_context(task, modality):
    text = load_template(task, modality)
    positions = [text.index(section) for section in ("ROLE", "REQUIREMENT", "EXAMPLE", "CONTEXT")]
    assert positions == sorted(positions)
    context_section = text.split("\nCONTEXT\n")[1]
    assert ("<VC>" in context_section) == (modality != "audio")
    assert ("<AC>" in context_section) == (modality != "visual")
    assert "according to the description" in text.lower()  # the rule is stated to the LLM


def test_template_example_replies_pass_their_own_rules():
    """Each template's EXAMPLE answer must be acceptable, or the rules contradict the template."""
    rules = load_rules()
    for task in TASKS:
        for modality in Modality:
            example = load_template(task, modality).split("\nEXAMPLE\n")[1].split("\nCONTEXT\n")[0]
            reply = example.split("captions:")[-1].split("\n", 1)[1]
            sample = reply_to_sample(reply, {"id": "x", "video": "x.mp4"}, task, modality, rules)
            assert len(sample["conversations"]) >= 2, (task, modality)


def test_build_messages_fills_captions_and_skips_missing_ones():
    template = load_template("conversation", "audio_visual")
    record = {
        "id": "a",
        "visual_captions": ["a cat sleeps", "a cat sleeps", "a cat wakes up."],
        "audio_captions": ["purring"],
    }
    prompt = build_messages(template, record, "audio_visual")[0]["content"]
    assert "Visual captions: A cat sleeps. A cat wakes up.\nAudio captions: Purring." in prompt
    assert "<VC>" not in prompt and "<AC>" not in prompt
    assert build_messages(template, {"id": "b", "visual_captions": ["x"], "audio_captions": []}, "audio_visual") is None
    assert build_messages(load_template("conversation", "visual"), {"id": "b", "visual_captions": ["x"]}, "visual")


def test_join_captions_drops_repeats_and_blanks():
    assert join_captions(["a dog", "  ", "a dog", "A dog.", "it barks!"]) == "A dog. It barks!"


# ---- reply parsing and rules -----------------------------------------------------------------


def test_parse_qa_pairs_handles_labels_markdown_and_continuations():
    assert parse_qa_pairs(GOOD_QA) == [
        ("What is the dog doing?", "The dog is running along the beach."),
        ("Where is it?", "On a sandy beach next to the sea."),
    ]
    assert parse_qa_pairs("1. Q: a?\n   A: b\n2. Q: c?\n   A: d") == [("a?", "b"), ("c?", "d")]


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("no questions at all", "no_qa_pairs"),
        ("Question: a?\nQuestion: b?\nAnswer: c", "unanswered_question"),
        ("Answer: c\nQuestion: a?", "answer_without_question"),
        ("Question: a?\nAnswer:", "empty_turn"),
    ],
)
def test_parse_qa_pairs_rejects_malformed(reply, reason):
    with pytest.raises(Rejected) as info:
        parse_qa_pairs(reply)
    assert info.value.reason == reason


def test_parse_description_strips_label_and_rejects_qa():
    assert parse_description("**Description:** A dog\nruns.") == "A dog runs."
    with pytest.raises(Rejected, match="qa_instead_of_description"):
        parse_description("Question: a?\nAnswer: b")


@pytest.mark.parametrize(
    "task, modality, reply, reason",
    [
        (
            "conversation",
            "audio_visual",
            "Question: What is it?\nAnswer: Based on the description, a dog.\n" * 2,
            "forbidden_phrase",
        ),
        ("conversation", "audio_visual", "Question: What?\nAnswer: The captions say a dog.\n" * 2, "forbidden_phrase"),
        (
            "conversation",
            "visual",
            "Question: What is it?\nAnswer: A dog.\nQuestion: Any sound?\nAnswer: You can hear barking.",
            "off_modality",
        ),
        (
            "description",
            "audio",
            "Description: You can see a dog barking loudly on a wide sandy beach by the sea today.",
            "off_modality",
        ),
        ("conversation", "visual", "Question: What is it?\nAnswer: A dog.", "too_few_qa_pairs"),
        ("description", "visual", "Description: A dog.", "too_short"),
        ("conversation", "visual", "Question: What is <VIS>?\nAnswer: A dog.\n" * 2, "modality_token_in_reply"),
    ],
)
def test_rule_breaking_replies_are_rejected(task, modality, reply, reason):
    with pytest.raises(Rejected) as info:
        reply_to_sample(reply, {"id": "x", "video": "x.mp4"}, task, modality, load_rules())
    assert info.value.reason == reason


@pytest.mark.parametrize("modality", list(Modality))
@pytest.mark.parametrize("task", TASKS)
def test_sample_format(task, modality):
    reply = GOOD_DESCRIPTION if task == "description" else GOOD_QA
    sample = reply_to_sample(reply, {"id": "clip7", "audio": "clip7.wav"}, task, modality, load_rules())
    assert sample["id"] == f"clip7__{task}__{modality}" and sample["audio"] == "clip7.wav"
    turns = sample["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    first = turns[0]["value"]
    tokens = [t for t in MODALITY_TOKENS if t in first]
    assert len(tokens) == 1 and first.startswith(tokens[0] + "\n")
    assert Modality.from_token(tokens[0]) == modality
    assert not any(t in turn["value"] for turn in turns[1:] for t in MODALITY_TOKENS)


# ---- the whole run against the fake server ----------------------------------------------------


def test_curate_counts_accepts_rejects_and_writes_the_pipeline_format(tmp_path, server):
    contexts = tmp_path / "contexts.jsonl"
    write_contexts(
        contexts,
        [
            context("v1", "good"),
            context("v2", "according"),
            context("v3", "prose"),
            context("v4", "unanswered"),
            context("i5", "good", media="image"),
        ],
    )
    out = tmp_path / "out.jsonl"
    counts = curate(contexts, out, client_for(server))
    # v1: 9 accepted; v2: 9 forbidden; v3: 6 no-QA + 3 too-short descriptions; v4: 6 unanswered + 3
    # descriptions that are QA; i5: 3 visual accepted, 6 skipped (an image has no audio).
    assert counts["accepted"] == 12
    assert counts["rejected: forbidden_phrase"] == 9
    assert counts["rejected: no_qa_pairs"] == 6 and counts["rejected: too_short"] == 3
    assert counts["rejected: unanswered_question"] == 6 and counts["rejected: qa_instead_of_description"] == 3
    assert counts["skipped: image has no audio"] == 6
    assert len(server.requests) == 12 + 9 + 9 + 9
    samples = read_finished(out)
    assert sorted(s["id"] for s in samples) == sorted(
        [f"v1__{t}__{m}" for t in TASKS for m in Modality] + [f"i5__{t}__visual" for t in TASKS]
    )
    assert all(("image" in s) == s["id"].startswith("i5") for s in samples)
    rejected = read_finished(f"{out}.rejected.jsonl")
    assert len(rejected) == 27 and all(r["reply"] and r["reason"] for r in rejected)
    # The output loads through the data pipeline's reader, each sample with its own modality.
    loaded, malformed = read_samples(out)
    assert not malformed and len(loaded) == 12
    by_id = {s["id"]: s for s in samples}
    for sample in loaded:
        assert sample.modality == by_id[sample.id]["modality"]
        assert sample.media_path == by_id[sample.id].get("video", by_id[sample.id].get("image"))
        assert len(sample.turns) == len(by_id[sample.id]["conversations"])
    table = summary_table(samples)
    assert re.search(r"Conversation\s+1\s+2\s+1\s+4", table)
    assert re.search(r"Total\s+3\s+6\s+3\s+12", table)


def test_curate_resumes_without_repeating_finished_requests(tmp_path, server):
    contexts = tmp_path / "contexts.jsonl"
    write_contexts(contexts, [context("a", "good"), context("b", "good"), context("c", "according")])
    out = tmp_path / "out.jsonl"
    # First run: every request about clip b fails (server errors), so b is not written.
    for task in TASKS:
        for modality in Modality:
            messages = build_messages(load_template(task, modality), context("b", "good"), modality)
            server.script[messages[0]["content"]] = [(500, "down")]
    first = curate(contexts, out, client_for(server), chunk_size=5)
    assert first["accepted"] == 9 and first["request_failed"] == 9 and first["rejected: forbidden_phrase"] == 9
    # An interruption leaves a half-written line behind.
    with open(out, "a") as f:
        f.write('{"id": "a__conv')
    requests_before = len(server.requests)
    server.script.clear()
    second = curate(contexts, out, client_for(server))
    assert second["accepted"] == 9 and second["already_done"] == 18 and second["request_failed"] == 0
    assert len(server.requests) - requests_before == 9  # only b's requests, nothing done twice
    ids = [s["id"] for s in read_finished(out)]
    assert len(ids) == len(set(ids)) == 18
    assert curate(contexts, out, client_for(server))["already_done"] == 27


def test_cli_prints_summary_and_never_the_key(tmp_path, server, monkeypatch, capsys):
    contexts = tmp_path / "contexts.jsonl"
    write_contexts(contexts, [context("a", "good"), context("b", "according")])
    monkeypatch.setenv("CURATION_TEST_KEY", "sk-very-secret")
    argv = [
        "--contexts",
        str(contexts),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--task",
        "conversation",
        "description",
        "--modality",
        "audio",
        "--endpoint",
        server.endpoint,
        "--model",
        "fake",
        "--api-key-env",
        "CURATION_TEST_KEY",
    ]
    assert curate_cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "sk-very-secret" not in printed.out + printed.err
    assert re.search(r"Conversation\s+1\s+0\s+0\s+1", printed.out)
    assert "rejected: forbidden_phrase: 2" in printed.out
    assert all(h["Authorization"] == "Bearer sk-very-secret" for _, h, _ in server.requests)


def test_relative_media_paths_follow_the_output_file(tmp_path, server):
    (tmp_path / "media").mkdir()
    (tmp_path / "contexts").mkdir()
    record = context("clip", "good")
    record["video"] = "../media/clip.mp4"  # relative to the contexts file, as extract_contexts writes it
    write_contexts(tmp_path / "contexts" / "c.jsonl", [record])
    out = tmp_path / "deep" / "er" / "instructions.jsonl"
    out.parent.mkdir(parents=True)
    curate(tmp_path / "contexts" / "c.jsonl", out, client_for(server), ["description"], ["visual"])
    (sample,), _ = read_samples(out)
    assert Path(sample.media_path).resolve() == (tmp_path / "media" / "clip.mp4").resolve()


def test_docs_example_is_what_the_code_makes():
    """docs/curation_example/instructions.jsonl must stay what its replies turn into today."""
    example = Path(__file__).parents[1] / "docs" / "curation_example"
    replies = json.loads((example / "replies.json").read_text())
    contexts = {c["id"]: c for c in map(json.loads, (example / "contexts.jsonl").read_text().splitlines())}
    rules = load_rules()
    accepted = read_finished(example / "instructions.jsonl")
    rejected = {r["id"] for r in read_finished(example / "instructions.jsonl.rejected.jsonl")}
    assert len(accepted) + len(rejected) == len(replies)
    for record in accepted:
        context_id, task, modality = record["id"].split("__")
        assert reply_to_sample(replies[record["id"]], contexts[context_id], task, modality, rules) == record
    for sample in rejected:
        context_id, task, modality = sample.split("__")
        with pytest.raises(Rejected):
            reply_to_sample(replies[sample], contexts[context_id], task, modality, rules)
