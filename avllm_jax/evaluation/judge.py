"""The LLM-judge protocol of Video-ChatGPT, in prompts written for this project.

Open-ended QA ("qa"): the judge sees the question, the reference answer and the prediction and
replies with a dict {'pred': 'yes' | 'no', 'score': 0..5}; accuracy is the share of 'yes' and
the score the mean. The video-chat benchmark scores five dimensions 0..5 with {'score': n}:
correctness, detail, context (from the generic questions), temporal (temporal questions) and
consistency (two phrasings of one question, both predictions judged together).
"""

from __future__ import annotations

from collections.abc import Sequence

from avllm_jax.curation.client import extract_dict

MAX_SCORE = 5

_QA_SYSTEM = (
    "You grade answers to questions about videos. You are given a question, the correct answer "
    "and a predicted answer. Decide whether the prediction means the same as the correct answer. "
    "Judge meaning, not wording: synonyms, paraphrases and extra correct detail are fine; a "
    "prediction that contradicts or misses the correct answer is not."
)
_QA_REQUEST = (
    "Question: {question}\n"
    "Correct answer: {reference}\n"
    "Predicted answer: {prediction}\n\n"
    "Reply with a Python dictionary and nothing else, of the form {{'pred': 'yes', 'score': 4}}: "
    "'pred' is 'yes' if the prediction matches the correct answer and 'no' otherwise; 'score' is "
    "an integer from 0 to 5 saying how well it matches (5 = fully)."
)

# What each video-chat dimension asks the judge to weigh.
_DIMENSION_CRITERIA = {
    "correctness": (
        "factual accuracy: does the prediction agree with the correct answer about what the video "
        "shows? Penalise every wrong or invented fact."
    ),
    "detail": (
        "detail orientation: does the prediction cover the points of the correct answer completely "
        "and specifically, rather than vaguely?"
    ),
    "context": (
        "contextual understanding: does the prediction fit the overall situation of the video that "
        "the correct answer describes, without statements out of context?"
    ),
    "temporal": (
        "temporal understanding: does the prediction get the order and timing of the events right, "
        "as the correct answer gives them?"
    ),
    "consistency": (
        "consistency: the same question was asked in two phrasings. Are the two predictions consistent "
        "with each other and with the correct answer? Contradicting predictions score low."
    ),
}
_DIMENSION_SYSTEM = (
    "You grade answers to questions about videos against a correct answer, on one criterion only: {criterion}"
)
_DIMENSION_REQUEST = (
    "{asked}"
    "Correct answer: {reference}\n\n"
    "Reply with a Python dictionary and nothing else, of the form {{'score': 3}}: an integer from 0 "
    "to 5 for this criterion alone (5 = best)."
)

DIMENSIONS = ("qa", *_DIMENSION_CRITERIA)


def judge_messages(
    dimension: str, questions: Sequence[str], references: Sequence[str], predictions: Sequence[str]
) -> list[dict]:
    """The chat messages asking the judge for one verdict on `dimension`."""
    reference = " / ".join(references)
    if dimension == "qa":
        request = _QA_REQUEST.format(question=questions[0], reference=reference, prediction=predictions[0])
        return [{"role": "system", "content": _QA_SYSTEM}, {"role": "user", "content": request}]
    if dimension not in _DIMENSION_CRITERIA:
        raise ValueError(f"unknown judge dimension {dimension!r}; known: {', '.join(DIMENSIONS)}")
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    if len(questions) == 1:
        asked = f"Question: {questions[0]}\nPredicted answer: {predictions[0]}\n"
    else:
        asked = "".join(
            f"Question {i}: {q}\nPredicted answer {i}: {p}\n" for i, (q, p) in enumerate(zip(questions, predictions), 1)
        )
    system = _DIMENSION_SYSTEM.format(criterion=_DIMENSION_CRITERIA[dimension])
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": _DIMENSION_REQUEST.format(asked=asked, reference=reference)},
    ]


def _score(value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"score {value!r} is not a number")
    try:
        score = float(str(value).strip())
    except ValueError:
        raise ValueError(f"score {value!r} is not a number") from None
    if not 0 <= score <= MAX_SCORE:
        raise ValueError(f"score {score:g} is outside 0..{MAX_SCORE}")
    return score


def _yes_no(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    word = str(value).strip().strip(".!'\"").lower()
    if word not in ("yes", "no"):
        raise ValueError(f"pred {value!r} is neither yes nor no")
    return word


def parse_verdict(dimension: str, reply: str) -> dict:
    """{'score': float} (and 'pred': 'yes' | 'no' for "qa") from a judge reply; ValueError when the
    reply holds no such dict. Keys are matched case-insensitively; JSON, Python-dict text, code
    fences and surrounding prose are all accepted."""
    found = {str(k).strip().lower(): v for k, v in extract_dict(reply).items()}
    if "score" not in found:
        raise ValueError(f"reply has no 'score': {reply.strip()[:80]!r}")
    verdict: dict[str, float | str] = {"score": _score(found["score"])}
    if dimension == "qa":
        if "pred" not in found:
            raise ValueError(f"reply has no 'pred': {reply.strip()[:80]!r}")
        verdict["pred"] = _yes_no(found["pred"])
    return verdict
