"""Judge prompts carry the inputs; replies are parsed robustly and bad ones rejected with a reason."""

import pytest

from avllm_jax.evaluation.judge import DIMENSIONS, judge_messages, parse_verdict


def test_qa_messages_hold_question_reference_and_prediction():
    messages = judge_messages("qa", ["what runs?"], ["dog"], ["a cat"])
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "Question: what runs?" in user and "Correct answer: dog" in user and "Predicted answer: a cat" in user
    assert "'pred'" in user and "'score'" in user


def test_dimension_messages_name_their_criterion_and_both_predictions():
    systems = {d: judge_messages(d, ["q"], ["ref"], ["p"])[0]["content"] for d in DIMENSIONS if d != "qa"}
    assert len(set(systems.values())) == 5  # five different criteria
    assert "order" in systems["temporal"]
    user = judge_messages("consistency", ["Who runs?", "Which person runs?"], ["A girl."], ["a girl", "a boy"])[1]
    assert "Question 1: Who runs?" in user["content"] and "Predicted answer 2: a boy" in user["content"]
    with pytest.raises(ValueError, match="2 questions but 1 predictions"):
        judge_messages("consistency", ["a", "b"], ["r"], ["p"])
    with pytest.raises(ValueError, match="unknown judge dimension"):
        judge_messages("fluency", ["a"], ["r"], ["p"])


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('{"pred": "yes", "score": 5}', {"pred": "yes", "score": 5.0}),
        ("{'pred': 'no', 'score': 1}", {"pred": "no", "score": 1.0}),
        ("Here is my verdict: {'Pred': 'Yes.', 'Score': '4'} -- the answers agree.", {"pred": "yes", "score": 4.0}),
        ('```json\n{"pred": "no", "score": 0}\n```', {"pred": "no", "score": 0.0}),
        ("{'pred': True, 'score': 3.5}", {"pred": "yes", "score": 3.5}),
    ],
)
def test_parse_qa_verdicts(reply, expected):
    assert parse_verdict("qa", reply) == expected


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("The prediction is correct.", "no JSON object"),
        ("{'pred': 'yes'}", "no 'score'"),
        ("{'score': 4}", "no 'pred'"),
        ("{'pred': 'maybe', 'score': 2}", "neither yes nor no"),
        ("{'pred': 'yes', 'score': 7}", "outside 0..5"),
        ("{'pred': 'yes', 'score': 'high'}", "not a number"),
    ],
)
def test_parse_rejects_unusable_replies(reply, reason):
    with pytest.raises(ValueError, match=reason):
        parse_verdict("qa", reply)


def test_parse_dimension_score_needs_no_pred():
    assert parse_verdict("detail", "Score: {'score': 2}") == {"score": 2.0}
