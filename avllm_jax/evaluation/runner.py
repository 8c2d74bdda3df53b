"""One benchmark run: answer every question, judge the answers, score them, write the report.

The model is reached only through `answer_fn(queries) -> answers`, so tests drive the whole
run with a stand-in and the command line (avllm_jax/evaluate.py) plugs in the real model.
Answers and verdicts are cached per question in the output directory (see report.py): a rerun
asks the model and the judge only for what is missing. Bad input never stops the run: a
question without an answer, a missing media file, a failed answer or a judge that keeps
failing is counted and listed in the summary, and everything else is still scored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tqdm

from avllm_jax.evaluation import metrics, report
from avllm_jax.evaluation.judge import judge_messages, parse_verdict
from avllm_jax.evaluation.processes import ProcessGroup
from avllm_jax.evaluation.tasks import TASKS, Sample, index_media, load_task, resolve_media
from avllm_jax.modality import Modality

logger = logging.getLogger(__name__)

PROBLEM_KINDS = ("no_question", "no_answer", "missing_media", "answer_failed", "judge_failed")


@dataclass(frozen=True)
class Query:
    """One question for the model about one media file."""

    sample_id: str
    media_path: str
    question: str
    modality: Modality | None  # None: whatever streams the file has


AnswerFn = Callable[[list[Query]], list[str]]


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _answer_batch(answer_fn: AnswerFn, batch: list[Query]) -> list[str | Exception]:
    """Answers for `batch`; when the batch fails, each query is retried alone so that one bad
    file costs only its own answer."""
    try:
        answers = answer_fn(batch)
    except Exception as error:
        if len(batch) == 1:
            return [error]
        return [_answer_batch(answer_fn, [query])[0] for query in batch]
    if len(answers) != len(batch):
        raise RuntimeError(f"answer_fn gave {len(answers)} answers for {len(batch)} questions")
    return [str(a).strip() for a in answers]


def _cached_predictions(samples, media_of, out_dir) -> tuple[dict[str, list[str]], list[Sample]]:
    """(predictions per sample id read from the answer cache, the samples still to answer)."""
    path = out_dir / report.PREDICTIONS_FILE
    records, unreadable = report.read_jsonl(path)
    if unreadable:
        logger.warning(f"{path}: {unreadable} unreadable line(s) ignored; those questions are answered again")
    cached = {r["id"]: r for r in records}
    predictions, pending = {}, []
    for s in samples:
        record = cached.get(s.id)
        if record and record["questions"] == list(s.questions) and record["media"] == media_of[s.id]:
            predictions[s.id] = record["predictions"]
        else:
            pending.append(s)
    return predictions, pending


def _answer(samples, media_of, answer_fn, modality, out_dir, batch_size, problems, group) -> dict[str, list[str]]:
    """Predictions per sample id: the cached ones, then the rest asked of `answer_fn`. With a
    process group, each process asks for its share and the leader writes and returns them all."""
    leader = group is None or group.is_leader
    predictions, pending = _cached_predictions(samples, media_of, out_dir) if leader else ({}, [])
    by_id = {s.id: s for s in samples}
    if group is not None:
        pending = [by_id[i] for i in group.broadcast_pending([s.id for s in pending] if leader else None)]
    mine = pending if group is None else group.share(pending)
    # A forced modality (--modality, or the task's) over the sample's own, over the file's streams.
    queries = [Query(s.id, media_of[s.id], q, modality or s.modality) for s in mine for q in s.questions]
    partial: dict[str, list[str]] = {}
    failed: set[str] = set()
    total = sum(len(s.questions) for s in (pending if leader else mine))
    where = "" if group is None else f" (process {group.index} of {group.count})"
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(report.JsonlAppender(out_dir / report.PREDICTIONS_FILE)) if leader else None
        bar = stack.enter_context(tqdm.tqdm(total=total, desc=f"answering{where}", unit="question"))

        def take(records, batch_problems):
            """The leader's side: a finished batch (its own or another process's) is kept."""
            for record in records:
                out.write(record)
                predictions[record["id"]] = record["predictions"]
            problems.extend(batch_problems)
            failed.update(sample_id for sample_id, _, _ in batch_problems)
            bar.update(
                sum(len(by_id[i].questions) for i in [r["id"] for r in records] + [p[0] for p in batch_problems])
            )

        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            records, batch_problems = [], []
            for query, answer in zip(batch, _answer_batch(answer_fn, batch)):
                if query.sample_id in failed:
                    continue
                if isinstance(answer, Exception):
                    failed.add(query.sample_id)
                    batch_problems.append(
                        (query.sample_id, "answer_failed", f"{query.media_path}: {_describe(answer)}")
                    )
                    continue
                sample = by_id[query.sample_id]
                answers = partial.setdefault(sample.id, [])
                answers.append(answer)
                if len(answers) == len(sample.questions):
                    records.append(
                        {
                            "id": sample.id,
                            "media": query.media_path,
                            "questions": list(sample.questions),
                            "answers": list(sample.answers),
                            "predictions": answers,
                        }
                    )
            if leader:
                take(records, batch_problems)
            else:
                bar.update(len(batch))
            if group is not None:
                group.send(records, batch_problems)
                if leader:
                    group.collect(take)
        if group is not None:
            silent = group.finish(take)
            for index in silent:
                lost = [s.id for s in group.share(pending, index) if s.id not in predictions and s.id not in failed]
                take(
                    [],
                    [
                        (i, "answer_failed", f"process {index} sent no answers for {group.timeout_s:.0f} s")
                        for i in lost
                    ],
                )
    return predictions


def _judge(samples, predictions, dimensions, judge, out_dir, problems) -> dict[tuple[str, str], dict]:
    """Verdicts per (sample id, dimension): the cached ones of this judge model, then the rest."""
    path = out_dir / report.VERDICTS_FILE
    records, unreadable = report.read_jsonl(path)
    if unreadable:
        logger.warning(f"{path}: {unreadable} unreadable line(s) ignored; those verdicts are asked again")
    verdicts = {}
    for r in records:
        if r.get("judge_model") == judge.model and r.get("predictions") == predictions.get(r["id"]):
            verdicts[(r["id"], r["dimension"])] = r
    pending = [(s, d) for s in samples if s.id in predictions for d in dimensions if (s.id, d) not in verdicts]
    messages = [judge_messages(d, s.questions, s.answers, predictions[s.id]) for s, d in pending]
    with report.JsonlAppender(path) as out, tqdm.tqdm(total=len(pending), desc="judging", unit="verdict") as bar:

        def on_result(index: int, reply) -> None:
            sample, dimension = pending[index]
            bar.update()
            if isinstance(reply, Exception):
                problems.append((sample.id, "judge_failed", f"{dimension}: {reply}"))
                return
            try:
                verdict = parse_verdict(dimension, reply)
            except ValueError as error:
                problems.append((sample.id, "judge_failed", f"{dimension}: unusable reply: {error}"))
                return
            record = {
                "id": sample.id,
                "dimension": dimension,
                "judge_model": judge.model,
                **verdict,
                "predictions": predictions[sample.id],
                "reply": reply,
            }
            out.write(record)
            verdicts[(sample.id, dimension)] = record

        if pending:
            judge.complete_many(messages, on_result=on_result)
    return verdicts


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _exact_match_scores(answered, predictions, per_question) -> dict:
    matches = [metrics.exact_match(predictions[s.id][0], s.answers) for s in answered]
    for s, match in zip(answered, matches):
        per_question[s.id]["exact_match"] = match
    return {"exact_match": {"accuracy": _mean([float(m) for m in matches]), "n": len(matches)}}


def _caption_scores(answered, predictions, per_question) -> dict:
    """CIDEr-D, and SPICE with SPIDEr = (CIDEr-D + SPICE) / 2 where SPICE runs (else the reason)."""
    if not answered:
        return {"cider_d": {"score": None, "n": 0}}
    candidates, references = [predictions[s.id][0] for s in answered], [s.answers for s in answered]
    cider, per_clip = metrics.cider_d(candidates, references)
    for s, value in zip(answered, per_clip):
        per_question[s.id]["cider_d"] = value
    n = len(answered)
    spice = metrics.spice(candidates, references)
    if isinstance(spice, str):
        return {"cider_d": {"score": cider, "n": n}, "spider": {"score": spice, "n": n}}
    return {
        "cider_d": {"score": cider, "n": n},
        "spice": {"score": spice[0], "n": n},
        "spider": {"score": (cider + spice[0]) / 2, "n": n},
    }


def _judge_scores(answered, verdicts, dimensions, per_question) -> dict:
    """Per dimension the mean score over the verdicts had; for "qa" also the share of 'yes'."""
    scores = {}
    for dimension in dimensions:
        judged = [verdicts[(s.id, dimension)] for s in answered if (s.id, dimension) in verdicts]
        for v in judged:
            per_question[v["id"]].setdefault("verdicts", {})[dimension] = {k: v[k] for k in ("pred", "score") if k in v}
        name = "judge" if dimension == "qa" else dimension
        accuracy = {"accuracy": _mean([float(v["pred"] == "yes") for v in judged])} if dimension == "qa" else {}
        scores[name] = {**accuracy, "score": _mean([v["score"] for v in judged]), "n": len(judged)}
    return scores


def run_evaluation(
    task_name: str,
    data_path: str | Path,
    media_root: str | Path,
    out_dir: str | Path,
    answer_fn: AnswerFn,
    *,
    judge=None,
    checkpoint: str = "",
    batch_size: int = 8,
    modality: str | None = None,
    group: ProcessGroup | None = None,
) -> dict | None:
    """Evaluates benchmark `task_name` on the annotation file `data_path` and returns the summary.

    `judge` is a `curation.client.ChatClient` (or anything with `.model` and `.complete_many`);
    without one, QA tasks report exact match only. `modality` overrides the task's default.
    `group`: the processes sharing the run (evaluation/processes.py). Each reads the annotation
    file and the media; each answers its share; only the leader touches `out_dir`, judges and
    returns the summary (the others return None once the leader has their answers).
    """
    samples = load_task(task_name, data_path)
    task = TASKS[task_name]
    if task.kind == "videochat" and judge is None:
        raise ValueError(f"task {task_name} is scored only by an LLM judge: pass a judge endpoint")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out_dir = Path(out_dir)
    if group is None or group.is_leader:
        out_dir.mkdir(parents=True, exist_ok=True)
        report.check_run(
            out_dir, {"task": task_name, "data": str(Path(data_path).resolve()), "checkpoint": str(checkpoint)}
        )

    problems: list[tuple[str, str, str]] = []  # (sample id, kind, detail)
    media_index = index_media(media_root)
    usable: list[Sample] = []
    media_of: dict[str, str] = {}
    for s in samples:
        if not all(s.questions):
            problems.append((s.id, "no_question", "the annotation has no question"))
        elif not s.answers:
            problems.append((s.id, "no_answer", "the annotation has no reference answer"))
        elif (path := resolve_media(s, media_index)) is None:
            problems.append((s.id, "missing_media", f"none of {', '.join(s.media)} found under {media_root}"))
        else:
            usable.append(s)
            media_of[s.id] = path

    forced = modality or task.modality
    predictions = _answer(
        usable, media_of, answer_fn, Modality(forced) if forced else None, out_dir, batch_size, problems, group
    )
    if group is not None:
        group.close()
        if not group.is_leader:
            return None
    verdicts = {}
    if judge is not None and task.judge_dimensions:
        verdicts = _judge(usable, predictions, task.judge_dimensions, judge, out_dir, problems)

    answered = [s for s in usable if s.id in predictions]
    per_question: dict[str, dict[str, Any]] = {
        s.id: {
            "id": s.id,
            "media": media_of.get(s.id),
            "questions": list(s.questions),
            "answers": list(s.answers),
            "predictions": predictions.get(s.id),
        }
        for s in samples
    }
    scores: dict[str, dict] = {}
    if task.kind == "qa":
        scores.update(_exact_match_scores(answered, predictions, per_question))
    if task.kind == "caption":
        scores.update(_caption_scores(answered, predictions, per_question))
    if judge is not None:
        scores.update(_judge_scores(answered, verdicts, task.judge_dimensions, per_question))

    order = {s.id: i for i, s in enumerate(samples)}
    problems.sort(key=lambda p: (order[p[0]], PROBLEM_KINDS.index(p[1]), p[2]))
    for sample_id, kind, detail in problems:
        per_question[sample_id].setdefault("problems", []).append(f"{kind}: {detail}")
    counts = {"questions": len(samples), "answered": len(answered)}
    if judge is not None and task.judge_dimensions:
        counts["verdicts"] = sum(1 for s in answered for d in task.judge_dimensions if (s.id, d) in verdicts)
    counts.update({kind: sum(p[1] == kind for p in problems) for kind in PROBLEM_KINDS})
    summary = {
        "task": task_name,
        "data": str(data_path),
        "checkpoint": str(checkpoint),
        "judge_model": judge.model if judge is not None else None,
        "counts": counts,
        "metrics": scores,
        "problems": [{"id": i, "kind": k, "detail": d} for i, k, d in problems],
    }
    report.write_jsonl(out_dir / report.PER_QUESTION_FILE, list(per_question.values()))
    report.write_summary(out_dir, summary)
    return summary
