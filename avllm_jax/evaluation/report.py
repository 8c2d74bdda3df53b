"""What an evaluation writes to its output directory, and how a rerun reads it back.

    run.json            task, annotation file and checkpoint; a rerun into the same directory must match
    predictions.jsonl   one line per answered question (the answer cache)
    verdicts.jsonl      one line per judge verdict, with the judge model (the verdict cache)
    per_question.jsonl  every question: references, predictions, exact match, verdicts, CIDEr-D
    summary.json / summary.md   counts, metrics, the judge model and every problem

The two caches are appended to one line at a time as results arrive, so an interrupted run
loses at most the line being written; a torn last line is skipped and its question redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_FILE = "run.json"
PREDICTIONS_FILE = "predictions.jsonl"
VERDICTS_FILE = "verdicts.jsonl"
PER_QUESTION_FILE = "per_question.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def check_run(out_dir: Path, run: dict) -> None:
    """Records `run` in out_dir, or checks that a previous run there was the same evaluation."""
    path = out_dir / RUN_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != run:
            differs = sorted(k for k in run.keys() | previous.keys() if run.get(k) != previous.get(k))
            raise ValueError(
                f"{out_dir} holds results of another evaluation (different {', '.join(differs)}); "
                "use a fresh --out directory"
            )
        return
    path.write_text(json.dumps(run, indent=2) + "\n")


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSONL file (none when it is absent) and the number of unreadable lines."""
    if not path.exists():
        return [], 0
    records, unreadable = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            unreadable += 1
    return records, unreadable


class JsonlAppender:
    """Appends one JSON record per line and flushes it, so that each finished result is on disk."""

    def __init__(self, path: Path):
        needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._file = open(path, "a", encoding="utf-8")
        if needs_newline:  # a torn last line from an interrupted run: start on a fresh line
            self._file.write("\n")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _number(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_markdown(summary: dict) -> str:
    lines = [f"# Evaluation: {summary['task']}", ""]
    lines += [f"- annotation file: `{summary['data']}`", f"- checkpoint: `{summary['checkpoint']}`"]
    lines += [f"- judge model: {summary['judge_model'] or 'none (no judge endpoint given)'}", ""]
    lines += [
        "## Metrics",
        "",
        "Over the questions answered (and judged); those listed under Problems are left out.",
        "",
    ]
    lines += ["| metric | value | over |", "|---|---|---|"]
    for name, metric in summary["metrics"].items():
        for key, value in metric.items():
            if key != "n":
                lines.append(f"| {name} {key} | {_number(value)} | {metric.get('n', '')} |")
    lines += ["", "## Counts", "", "| | questions |", "|---|---|"]
    lines += [f"| {key.replace('_', ' ')} | {value} |" for key, value in summary["counts"].items()]
    problems = summary["problems"]
    lines += ["", f"## Problems ({len(problems)})", ""]
    if problems:
        lines += ["| question | kind | detail |", "|---|---|---|"]
        lines += [f"| {p['id']} | {p['kind']} | {p['detail'].replace('|', '/')} |" for p in problems]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, summary: dict) -> None:
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out_dir / SUMMARY_MD).write_text(summary_markdown(summary))
