"""Instruction data from captions: prompt templates, LLM replies, rule checks, JSON-lines output.

Paper §3.3: frame captions V_c and audio captions A_c fill the CONTEXT of a ROLE / REQUIREMENT /
EXAMPLE / CONTEXT template; a chat LLM writes a multi-turn conversation, a detailed description
or complex-reasoning questions and answers; each reply becomes one training sample
`{"id", "video"|"image"|"audio", "modality", "task", "conversations"}` whose first human turn
holds the modality token. Replies that break the template's rules are rejected and counted.
Templates and rules are data files in `templates/` (edit them, or pass another directory).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from avllm_jax.curation.client import ChatClient, ChatError
from avllm_jax.data.conversation import MEDIA_KEYS, first_user_message
from avllm_jax.modality import MODALITY_TOKENS, Modality

logger = logging.getLogger(__name__)

TASKS = ("conversation", "description", "reasoning")
TEMPLATE_DIR = Path(__file__).parent / "templates"
VISUAL_PLACEHOLDER, AUDIO_PLACEHOLDER = "<VC>", "<AC>"


class Rejected(ValueError):
    """A reply that breaks the rules; `reason` is a short key for the rejection counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def load_template(task: str, modality: str, template_dir: str | os.PathLike = TEMPLATE_DIR) -> str:
    """The template text for `task` x `modality`, checked for the placeholders its modality needs."""
    if task not in TASKS or modality not in list(Modality):
        raise ValueError(
            f"unknown task/modality {task!r}/{modality!r}; choose from {TASKS} x {[m.value for m in Modality]}"
        )
    path = Path(template_dir) / f"{task}_{modality}.txt"
    text = path.read_text(encoding="utf-8")
    needed = {"visual": [VISUAL_PLACEHOLDER], "audio": [AUDIO_PLACEHOLDER]}.get(
        modality, [VISUAL_PLACEHOLDER, AUDIO_PLACEHOLDER]
    )
    for placeholder in needed:
        if placeholder not in text:
            raise ValueError(f"template {path} lacks the {placeholder} placeholder its CONTEXT needs")
    return text


def load_rules(template_dir: str | os.PathLike = TEMPLATE_DIR) -> dict:
    """rules.json and description_questions.json of a template directory, in one dict."""
    template_dir = Path(template_dir)
    rules = json.loads((template_dir / "rules.json").read_text(encoding="utf-8"))
    rules["description_questions"] = json.loads(
        (template_dir / "description_questions.json").read_text(encoding="utf-8")
    )
    return rules


def join_captions(captions: list[str]) -> str:
    """Captions as sentences, repeats dropped (neighbouring frames often get the same caption)."""
    sentences = []
    for caption in captions:
        caption = " ".join(caption.split()).strip()
        if not caption:
            continue
        sentence = caption[0].upper() + caption[1:]
        if sentence[-1] not in ".!?":
            sentence += "."
        if sentence not in sentences:
            sentences.append(sentence)
    return " ".join(sentences)


def build_messages(template: str, context: dict, modality: str) -> list[dict] | None:
    """The chat request for one context record, or None when it lacks captions `modality` needs."""
    visual, audio = (
        join_captions(context.get("visual_captions") or []),
        join_captions(context.get("audio_captions") or []),
    )
    if (modality != "audio" and not visual) or (modality != "visual" and not audio):
        return None
    prompt = template.replace(VISUAL_PLACEHOLDER, visual).replace(AUDIO_PLACEHOLDER, audio)
    return [{"role": "user", "content": prompt}]


_LABEL = re.compile(r"^[\s>*#\-\d.)]*\**\s*(question|q|answer|a)\s*\d*\s*\**\s*[:：]\s*\**\s*(.*)$", re.IGNORECASE)
_DESCRIPTION_LABEL = re.compile(r"^\s*\**\s*(?:detail(?:ed)?\s+)?description\s*\**\s*[:：]\s*\**\s*", re.IGNORECASE)


def parse_qa_pairs(reply: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from "Question: ... / Answer: ..." lines; text before the first
    question is ignored, lines without a label continue the turn above. Rejected when malformed."""
    turns: list[list[str]] = []  # [kind, text]
    for line in reply.splitlines():
        match = _LABEL.match(line)
        if match:
            kind = "question" if match.group(1).lower().startswith("q") else "answer"
            turns.append([kind, match.group(2).strip()])
        elif turns and line.strip():
            turns[-1][1] = f"{turns[-1][1]} {line.strip()}".strip()
    pairs = []
    for i in range(0, len(turns), 2):
        question, answer = turns[i], turns[i + 1] if i + 1 < len(turns) else None
        if question[0] != "question":
            raise Rejected("answer_without_question", question[1][:60])
        if answer is None or answer[0] != "answer":
            raise Rejected("unanswered_question", question[1][:60])
        q, a = question[1].strip("* "), answer[1].strip("* ")
        if not q or not a:
            raise Rejected("empty_turn")
        pairs.append((q, a))
    if not pairs:
        raise Rejected("no_qa_pairs")
    return pairs


def parse_description(reply: str) -> str:
    """The description paragraph, its "Description:" label removed."""
    if any(_LABEL.match(line) for line in reply.splitlines()):
        raise Rejected("qa_instead_of_description")
    return " ".join(_DESCRIPTION_LABEL.sub("", reply.strip(), count=1).split()).strip("* ")


def _contains_any(text: str, phrases: list[str]) -> str | None:
    text = text.lower().replace("\u2019", "'")
    for phrase in phrases:
        if re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text):
            return phrase
    return None


def check_rules(texts: list[str], task: str, modality: str, rules: dict) -> None:
    """Raises Rejected when the parsed texts of one reply break a rule."""
    for text in texts:
        if any(token in text for token in MODALITY_TOKENS):
            raise Rejected("modality_token_in_reply")
        if phrase := _contains_any(text, rules["forbidden_phrases"]):
            raise Rejected("forbidden_phrase", phrase)
        if word := _contains_any(text, rules["off_modality_words"].get(modality, [])):
            raise Rejected("off_modality", word)
    if task == "description":
        if len(texts[-1].split()) < rules["min_description_words"]:
            raise Rejected("too_short")
    elif len(texts) // 2 < rules["min_qa_pairs"][task]:
        raise Rejected("too_few_qa_pairs")


def sample_id(context_id: str, task: str, modality: str) -> str:
    return f"{context_id}__{task}__{modality}"


def reply_to_sample(reply: str, context: dict, task: str, modality: str, rules: dict) -> dict:
    """One training sample in the data pipeline's format (media path as in `context`), or Rejected."""
    if task == "description":
        questions = rules["description_questions"][modality]
        question = questions[zlib.crc32(context["id"].encode()) % len(questions)]
        pairs = [(question, parse_description(reply))]
        check_rules([pairs[0][1]], task, modality, rules)
    else:
        pairs = parse_qa_pairs(reply)
        check_rules([text for pair in pairs for text in pair], task, modality, rules)
    conversations = []
    for i, (question, answer) in enumerate(pairs):
        conversations.append({"from": "human", "value": first_user_message(question, modality) if i == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    media_key = next(key for key in MEDIA_KEYS if key in context)
    return {
        "id": sample_id(context["id"], task, modality),
        media_key: context[media_key],
        "modality": modality,
        "task": task,
        "conversations": conversations,
    }


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file; an invalid line is an error naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return records


def read_finished(path: str | os.PathLike) -> list[dict]:
    """Records already written to an output file. A last line cut off by an interruption (no
    newline, not valid JSON) is removed from the file, so appending continues cleanly."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
            data += b"\n"
        except json.JSONDecodeError:
            logger.warning(f"{path}: dropping an incomplete last line left by an interrupted run")
            data = data[:cut]
        path.write_bytes(data)
    return read_jsonl(path)


def read_contexts(path: str | os.PathLike) -> list[dict]:
    """Context records `{id, video|image|audio, visual_captions, audio_captions}`, checked."""
    contexts = read_jsonl(path)
    seen = set()
    for number, context in enumerate(contexts, 1):
        where = f"{path}: record {number}"
        if not isinstance(context.get("id"), str) or not context["id"]:
            raise ValueError(f"{where} has no string 'id'")
        if context["id"] in seen:
            raise ValueError(f"{where} repeats id {context['id']!r}")
        seen.add(context["id"])
        if not any(key in context for key in MEDIA_KEYS):
            raise ValueError(f"{where} (id {context['id']!r}) names no media file ({'/'.join(MEDIA_KEYS)})")
    return contexts


def _rebase(path: str, from_dir: Path, to_dir: Path) -> str:
    """A media path relative to `from_dir`, made relative to `to_dir` (absolute paths stay)."""
    if os.path.isabs(path):
        return path
    return os.path.relpath(from_dir / path, to_dir)


def curate(
    contexts_path: str | os.PathLike,
    out_path: str | os.PathLike,
    client: ChatClient,
    tasks: Sequence[str] = tuple(TASKS),
    modalities: Sequence[str] = tuple(Modality),
    template_dir: str | os.PathLike = TEMPLATE_DIR,
    chunk_size: int = 512,
) -> Counter:
    """Writes accepted samples to `out_path` and rejected replies to `<out_path>.rejected.jsonl`.

    Resumable: samples whose id is in either file already are not requested again; failed
    requests are not written, so a rerun retries them. Relative media paths, relative to the
    contexts file's directory there, are written relative to the output file's directory, where
    the data pipeline looks for them. Returns this run's counts.
    """
    rules = load_rules(template_dir)
    templates = {(t, m): load_template(t, m, template_dir) for t in tasks for m in modalities}
    rejected_path = Path(f"{out_path}.rejected.jsonl")
    done = {r["id"] for r in read_finished(out_path)} | {r["id"] for r in read_finished(rejected_path)}
    counts: Counter = Counter()
    jobs = []  # (context, task, modality, messages)
    contexts_dir, out_dir = Path(contexts_path).absolute().parent, Path(out_path).absolute().parent
    for context in read_contexts(contexts_path):
        media_key = next(key for key in MEDIA_KEYS if key in context)
        context = {**context, media_key: _rebase(context[media_key], contexts_dir, out_dir)}
        for task, modality in templates:
            if sample_id(context["id"], task, modality) in done:
                counts["already_done"] += 1
                continue
            if modality != "visual" and "image" in context:
                counts["skipped: image has no audio"] += 1
                continue
            messages = build_messages(templates[task, modality], context, modality)
            if messages is None:
                counts[f"skipped: no {modality.replace('_', '-')} captions"] += 1
                continue
            jobs.append((context, task, modality, messages))

    with (
        open(out_path, "a", encoding="utf-8") as out,
        open(rejected_path, "a", encoding="utf-8") as rejected,
        tqdm(total=len(jobs), desc="curating", unit="reply") as progress,
    ):
        for start in range(0, len(jobs), chunk_size):
            chunk = jobs[start : start + chunk_size]

            def write(index: int, reply: str | ChatError, chunk=chunk) -> None:
                context, task, modality, _ = chunk[index]
                progress.update()
                if isinstance(reply, ChatError):
                    counts["request_failed"] += 1
                    progress.write(f"{context['id']} {task}/{modality}: {reply}")
                    return
                try:
                    sample = reply_to_sample(reply, context, task, modality, rules)
                except Rejected as why:
                    counts[f"rejected: {why.reason}"] += 1
                    record = {
                        "id": sample_id(context["id"], task, modality),
                        "task": task,
                        "modality": modality,
                        "reason": str(why),
                        "reply": reply,
                    }
                    rejected.write(json.dumps(record, ensure_ascii=False) + "\n")
                    rejected.flush()
                    return
                counts["accepted"] += 1
                out.write(json.dumps(sample, ensure_ascii=False) + "\n")
                out.flush()

            client.complete_many([job[3] for job in chunk], on_result=write)
    return counts


def summary_table(samples: list[dict]) -> str:
    """Accepted samples per task x modality, laid out like the paper's Table 10."""
    counts = Counter((s.get("task"), s.get("modality")) for s in samples)
    columns = [("audio", "Audio"), ("visual", "Visual"), ("audio_visual", "Aud-Vis")]
    rows = [["Instruction type", *(name for _, name in columns), "Total"]]
    for task in TASKS:
        cells = [counts[task, modality] for modality, _ in columns]
        rows.append([task.capitalize(), *map(str, cells), str(sum(cells))])
    totals = [sum(counts[task, modality] for task in TASKS) for modality, _ in columns]
    rows.append(["Total", *map(str, totals), str(sum(totals))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
