"""Whole evaluation runs with a stand-in model and a fake OpenAI-compatible judge on 127.0.0.1."""

import http.server
import json
import math
import re
import threading
import time
from collections import Counter

import pytest

from avllm_jax.curation.client import ChatClient
from avllm_jax.evaluation import report
from avllm_jax.evaluation.runner import run_evaluation

API_KEY = "sk-test-secret-0123456789"


class FakeJudge:
    """An OpenAI-compatible chat server. `script(question, attempt)` gives (status, reply text)
    for the `attempt`-th request (0-based) about `question`; by default a well-behaved judge
    that says yes/5 when the prediction equals the correct answer and no/1 otherwise."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.attempts: Counter = Counter()
        self.script = None
        lock = threading.Lock()
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                question = re.search(r"Question(?: 1)?: (.*)", user).group(1)
                with lock:
                    judge.requests.append(body)
                    judge.headers.append(dict(self.headers))
                    attempt = judge.attempts[question]
                    judge.attempts[question] += 1
                status, text = (judge.script or judge.honest)(question, attempt, user)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def honest(question, attempt, user):
        reference = re.search(r"Correct answer: (.*)", user).group(1)
        predicted = re.search(r"Predicted answer(?: 1)?: (.*)", user).group(1)
        if predicted == reference:
            return 200, '{"pred": "yes", "score": 5}'
        return 200, "{'pred': 'no', 'score': 1}"

    def client(self, **kwargs):
        return ChatClient(self.endpoint, "fake-judge-1", API_KEY, initial_backoff_s=0.0, max_retries=2, **kwargs)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge():
    server = FakeJudge()
    yield server
    server.close()


def write_msrvtt(tmp_path, records, media_names):
    data = tmp_path / "test_qa.json"
    data.write_text(json.dumps(records))
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    for name in media_names:
        (media / name).write_bytes(b"")  # never decoded: the stand-in model only reads the question
    return data, media


def qa_records(n):
    return [{"id": i, "video_id": i, "question": f"question {i}?", "answer": f"answer {i}"} for i in range(n)]


def scripted_answers(answers):
    """A stand-in for the model: answers each question from a dict, recording every batch."""
    calls = []

    def answer_fn(batch):
        calls.append([q.question for q in batch])
        return [answers[q.question] for q in batch]

    answer_fn.calls = calls
    return answer_fn


def test_judge_protocol_retries_failures_and_rerun_fills_gaps(tmp_path, judge, capsys):
    records = qa_records(6)
    data, media = write_msrvtt(tmp_path, records, [f"video{i}.mp4" for i in range(6)])
    answers = {f"question {i}?": f"answer {i}" for i in range(6)}
    answers["question 1?"] = "wrong"
    answers["question 2?"] = "The Answer 2!"  # exact match after normalisation; the judge sees the raw text

    def script(question, attempt, user):
        if question == "question 1?":  # prose around a Python dict
            return 200, "My evaluation: {'pred': 'no', 'score': 1}. Hope this helps."
        if question == "question 2?":  # rate-limited once, then a fenced JSON reply
            return (429, "slow down") if attempt == 0 else (200, '```json\n{"pred": "Yes", "score": "4"}\n```')
        if question == "question 3?":  # server errors past the retry limit
            return 500, "internal error"
        if question == "question 4?":  # no dict at all
            return 200, "The prediction looks right to me."
        if question == "question 5?":  # a dict with an impossible score
            return 200, "{'pred': 'yes', 'score': 9}"
        return 200, '{"pred": "yes", "score": 5}'

    judge.script = script
    out = tmp_path / "out"
    summary = run_evaluation(
        "msrvtt_qa", data, media, out, scripted_answers(answers), judge=judge.client(), checkpoint="ckpt", batch_size=4
    )

    # Every request: the configured model, temperature 0, the key only in the Authorization header.
    assert {r["model"] for r in judge.requests} == {"fake-judge-1"}
    assert {r["temperature"] for r in judge.requests} == {0.0}
    assert {h["Authorization"] for h in judge.headers} == {f"Bearer {API_KEY}"}
    assert judge.attempts["question 2?"] == 2  # 429, then success
    assert judge.attempts["question 3?"] == 3  # 1 + max_retries=2, then given up

    assert summary["judge_model"] == "fake-judge-1"
    # Verdicts for questions 0 (yes 5), 1 (no 1), 2 (yes 4); 3, 4, 5 failed.
    assert summary["metrics"]["judge"] == {"accuracy": pytest.approx(2 / 3), "score": pytest.approx(10 / 3), "n": 3}
    # Exact match over all six answers: 0, 2, 3, 4, 5 match; 1 does not.
    assert summary["metrics"]["exact_match"] == {"accuracy": pytest.approx(5 / 6), "n": 6}
    assert summary["counts"]["judge_failed"] == 3 and summary["counts"]["verdicts"] == 3
    failed = [(p["id"], p["kind"]) for p in summary["problems"]]
    assert failed == [("3", "judge_failed"), ("4", "judge_failed"), ("5", "judge_failed")]
    details = {p["id"]: p["detail"] for p in summary["problems"]}
    assert "HTTP 500" in details["3"] and "no JSON object" in details["4"] and "outside 0..5" in details["5"]

    # The key is never written anywhere nor printed.
    for path in out.iterdir():
        assert API_KEY not in path.read_text()
    captured = capsys.readouterr()
    assert API_KEY not in captured.out + captured.err

    # The summary files say the same: the judge model and every failed question.
    markdown = (out / report.SUMMARY_MD).read_text()
    assert "fake-judge-1" in markdown and "| 3 | judge_failed |" in markdown
    assert json.loads((out / report.SUMMARY_JSON).read_text()) == summary

    # A rerun with a healthy judge asks only for the three missing verdicts, and no answers.
    judge.script = None
    judge.requests.clear()
    rerun_answers = scripted_answers(answers)
    summary = run_evaluation("msrvtt_qa", data, media, out, rerun_answers, judge=judge.client(), checkpoint="ckpt")
    assert rerun_answers.calls == []
    assert sorted(re.search(r"Question: (.*)", r["messages"][-1]["content"]).group(1) for r in judge.requests) == [
        "question 3?",
        "question 4?",
        "question 5?",
    ]
    assert summary["counts"]["judge_failed"] == 0 and summary["problems"] == []
    # Now 0, 3, 4, 5 are yes/5 (honest judge), 1 no/1, 2 yes/4 (cached).
    assert summary["metrics"]["judge"] == {"accuracy": pytest.approx(5 / 6), "score": pytest.approx(25 / 6), "n": 6}


class Interrupted(BaseException):
    """Stands in for Ctrl-C or a killed job (not an Exception, so nothing may swallow it)."""


def test_resumed_run_gives_the_uninterrupted_summary(tmp_path, judge):
    records = qa_records(8)
    data, media = write_msrvtt(tmp_path, records, [f"video{i}.mp4" for i in range(8)])
    answers = {f"question {i}?": (f"answer {i}" if i % 3 else "no idea") for i in range(8)}

    whole = run_evaluation(
        "msrvtt_qa",
        data,
        media,
        tmp_path / "whole",
        scripted_answers(answers),
        judge=judge.client(),
        checkpoint="ckpt",
        batch_size=2,
    )

    def interrupted_after_two_batches(batch):
        if len(interrupted_after_two_batches.calls) == 2:
            raise Interrupted
        interrupted_after_two_batches.calls.append(batch)
        return [answers[q.question] for q in batch]

    interrupted_after_two_batches.calls = []
    resumed_dir = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        run_evaluation(
            "msrvtt_qa",
            data,
            media,
            resumed_dir,
            interrupted_after_two_batches,
            judge=judge.client(),
            checkpoint="ckpt",
            batch_size=2,
        )
    assert len(report.read_jsonl(resumed_dir / report.PREDICTIONS_FILE)[0]) == 4

    rest = scripted_answers(answers)
    resumed = run_evaluation(
        "msrvtt_qa", data, media, resumed_dir, rest, judge=judge.client(), checkpoint="ckpt", batch_size=2
    )
    assert sorted(q for call in rest.calls for q in call) == [f"question {i}?" for i in range(4, 8)]
    assert resumed == whole
    assert (resumed_dir / report.SUMMARY_MD).read_text() == (tmp_path / "whole" / report.SUMMARY_MD).read_text()
    assert (resumed_dir / report.PER_QUESTION_FILE).read_text() == (
        tmp_path / "whole" / report.PER_QUESTION_FILE
    ).read_text()

    # Judging interrupted too: keep 3 verdicts and a torn fourth line; only 5 verdicts are asked again.
    verdict_lines = (resumed_dir / report.VERDICTS_FILE).read_text().splitlines()
    (resumed_dir / report.VERDICTS_FILE).write_text("\n".join(verdict_lines[:3]) + "\n" + verdict_lines[3][:20])
    judge.requests.clear()
    again = run_evaluation(
        "msrvtt_qa",
        data,
        media,
        resumed_dir,
        scripted_answers({}),
        judge=judge.client(),
        checkpoint="ckpt",
        batch_size=2,
    )
    assert len(judge.requests) == 5
    assert again == whole
    records_after, unreadable = report.read_jsonl(resumed_dir / report.VERDICTS_FILE)
    assert unreadable == 1 and len(records_after) == 8  # the torn line stays alone on its line


def test_bad_input_is_counted_and_listed(tmp_path):
    records = qa_records(5)
    del records[1]["answer"]  # an annotation line without an answer
    data, media = write_msrvtt(tmp_path, records, ["video0.mp4", "video1.mp4", "video3.mp4", "video4.mp4"])
    # video2 is missing; video3 cannot be decoded (the stand-in raises as load_media would)
    answers = {f"question {i}?": f"answer {i}" for i in range(5)}
    batches = []

    def answer_fn(batch):
        batches.append([q.sample_id for q in batch])
        if any(q.media_path.endswith("video3.mp4") for q in batch):
            raise ValueError(f"{batch[-1].media_path}: no decodable stream")
        return [answers[q.question] for q in batch]

    out = tmp_path / "out"
    summary = run_evaluation("msrvtt_qa", data, media, out, answer_fn, batch_size=8)
    # One batch of the three usable questions fails, then each is retried alone.
    assert batches == [["0", "3", "4"], ["0"], ["3"], ["4"]]
    counts = summary["counts"]
    assert (counts["questions"], counts["answered"]) == (5, 2)
    assert (counts["no_answer"], counts["missing_media"], counts["answer_failed"]) == (1, 1, 1)
    assert [(p["id"], p["kind"]) for p in summary["problems"]] == [
        ("1", "no_answer"),
        ("2", "missing_media"),
        ("3", "answer_failed"),
    ]
    assert "video2" in summary["problems"][1]["detail"]
    assert "video3.mp4" in summary["problems"][2]["detail"]
    assert summary["metrics"]["exact_match"] == {"accuracy": 1.0, "n": 2}
    assert "judge" not in summary["metrics"] and summary["judge_model"] is None
    per_question = report.read_jsonl(out / report.PER_QUESTION_FILE)[0]
    assert [q["id"] for q in per_question] == ["0", "1", "2", "3", "4"]
    assert per_question[2]["problems"] == [summary["problems"][1]["kind"] + ": " + summary["problems"][1]["detail"]]
    markdown = (out / report.SUMMARY_MD).read_text()
    assert "| 1 | no_answer |" in markdown and "| 2 | missing_media |" in markdown
    # Another evaluation into the same directory is refused instead of mixing results.
    with pytest.raises(ValueError, match="checkpoint"):
        run_evaluation("msrvtt_qa", data, media, out, answer_fn, checkpoint="other")


def test_captioning_reports_cider_d_and_spice_unavailable(tmp_path, monkeypatch):
    monkeypatch.delenv("SPICE_JAR", raising=False)
    data = tmp_path / "clotho_captions_evaluation.csv"
    data.write_text("file_name,caption_1,caption_2,caption_3,caption_4,caption_5\none.wav,a b,,,,\ntwo.wav,c d,,,,\n")
    (tmp_path / "one.wav").write_bytes(b"")
    (tmp_path / "two.wav").write_bytes(b"")
    modalities = []

    def answer_fn(batch):
        modalities.extend(q.modality for q in batch)
        return ["a b" if q.media_path.endswith("one.wav") else "c c" for q in batch]

    summary = run_evaluation("clotho", data, tmp_path, tmp_path / "out", answer_fn)
    assert modalities == ["audio", "audio"]
    # Worked in tests/test_metrics.py: "a b" vs "a b" scores 5, "c c" vs "c d" 10 / (8 sqrt 2).
    assert summary["metrics"]["cider_d"] == {"score": pytest.approx((5 + 10 / (8 * math.sqrt(2))) / 2), "n": 2}
    assert summary["metrics"]["spider"] == {"score": "SPICE unavailable", "n": 2}
    assert "SPICE unavailable" in (tmp_path / "out" / report.SUMMARY_MD).read_text()


def test_consistency_benchmark_answers_both_phrasings_and_needs_a_judge(tmp_path, judge):
    data = tmp_path / "consistency_qa.json"
    data.write_text(
        json.dumps(
            [
                {"video_name": "v_a", "Q1": "Who runs?", "Q2": "Which person runs?", "A": "a girl"},
                {"video_name": "v_b", "Q1": "What falls?", "Q2": "Which thing falls?", "A": "a cup"},
            ]
        )
    )
    for name in ("v_a.mp4", "v_b.mkv"):
        (tmp_path / name).write_bytes(b"")
    answers = {
        "Who runs?": "a girl",
        "Which person runs?": "a boy",
        "What falls?": "a cup",
        "Which thing falls?": "a cup",
    }
    with pytest.raises(ValueError, match="judge"):
        run_evaluation("videochat_consistency", data, tmp_path, tmp_path / "out", scripted_answers(answers))

    def script(question, attempt, user):  # 5 when both predictions equal the reference, else 2
        predicted = re.findall(r"Predicted answer \d: (.*)", user)
        reference = re.search(r"Correct answer: (.*)", user).group(1)
        return 200, f"{{'score': {5 if set(predicted) == {reference} else 2}}}"

    judge.script = script
    summary = run_evaluation(
        "videochat_consistency", data, tmp_path, tmp_path / "out", scripted_answers(answers), judge=judge.client()
    )
    assert len(judge.requests) == 2  # one verdict per pair of answers
    assert summary["metrics"]["consistency"] == {"score": pytest.approx(3.5), "n": 2}
    predictions = report.read_jsonl(tmp_path / "out" / report.PREDICTIONS_FILE)[0]
    assert sorted(map(tuple, (p["predictions"] for p in predictions))) == [("a cup", "a cup"), ("a girl", "a boy")]


def config_only_model(tmp_path) -> str:
    """A model directory holding its config and no weights: the command line checks it is a
    model; the tests replace what would load the weights."""
    from tiny_models import tiny_config, tiny_tokenizer

    from avllm_jax import checkpoint

    path = str(tmp_path / "ckpt")
    checkpoint.write_model_config(path, tiny_config(tiny_tokenizer()))
    return path


def test_command_line_reads_the_key_from_the_environment_and_never_prints_it(tmp_path, judge, monkeypatch, capsys):
    from avllm_jax import evaluate

    data, media = write_msrvtt(tmp_path, qa_records(2), ["video0.mp4", "video1.mp4"])
    built = {}

    def fake_model_answer_fn(checkpoint, **settings):
        built.update(settings, checkpoint=checkpoint)
        return scripted_answers({"question 0?": "answer 0", "question 1?": "nothing"})

    monkeypatch.setattr(evaluate, "model_answer_fn", fake_model_answer_fn)
    monkeypatch.setenv("MY_JUDGE_KEY", API_KEY)
    out = tmp_path / "out"
    model = config_only_model(tmp_path)
    summary = evaluate.main(
        [
            "--checkpoint",
            model,
            "--task",
            "msrvtt_qa",
            "--data",
            str(data),
            "--media-root",
            str(media),
            "--out",
            str(out),
            "--judge-endpoint",
            judge.endpoint,
            "--judge-model",
            "m-2",
            "--judge-key-env",
            "MY_JUDGE_KEY",
            "--num-frames",
            "8",
        ]
    )
    assert built == {
        "checkpoint": model,
        "max_new_tokens": 128,
        "media_settings": {
            "num_frames": 8,
            "num_audio_segments": None,
            "image_size": None,
            "audio_max_length_s": None,
            "audio_truncation": None,
            "feature_cache": None,
        },
    }
    assert {h["Authorization"] for h in judge.headers} == {f"Bearer {API_KEY}"}
    assert {r["model"] for r in judge.requests} == {"m-2"}
    assert summary["metrics"]["judge"]["accuracy"] == 0.5
    printed = capsys.readouterr()
    assert "judge accuracy 0.5000" in printed.out and str(out / "summary.md") in printed.out
    assert API_KEY not in printed.out + printed.err
    assert all(API_KEY not in p.read_text() for p in out.iterdir())

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SystemExit, match="judge"):
        evaluate.main(
            [
                "--checkpoint",
                "ckpt",
                "--task",
                "videochat_generic",
                "--data",
                str(data),
                "--media-root",
                str(media),
                "--out",
                str(tmp_path / "other"),
            ]
        )


def test_model_answer_fn_decodes_media_and_counts_undecodable_files(tmp_path, monkeypatch):
    """The command line's answer function with the model and generation stubbed out: real files
    are decoded with the requested sizes and the data config's audio sample rate, and an
    undecodable one costs only its own answer."""
    import jax
    import numpy as np

    from avllm_jax import evaluate
    from avllm_jax.data.media import write_media

    data, media = write_msrvtt(tmp_path, qa_records(3), [])
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(48000) / 48000)).astype(np.float32)
    for i in (0, 1):  # one second; video0 with a 48 kHz tone
        write_media(
            media / f"video{i}.mp4",
            frames=np.full((6, 32, 32, 3), 40 * (i + 1), np.uint8),
            fps=6,
            audio=tone if i == 0 else None,
        )
    (media / "video2.mp4").write_text("this is not a video\n" * 20)

    seen, audio = [], []

    def answer_questions(
        model,
        tokenizer,
        media_list,
        questions,
        *,
        modality=None,
        max_new_tokens=0,
        temperature=1.0,
        data_config=None,
        mesh=None,
    ):
        assert (model, tokenizer, max_new_tokens, temperature) == ("model copied onto the mesh", "tokenizer", 5, 0.0)
        assert mesh.devices.size == len(jax.local_devices()) == 8  # the batch is split over every local device
        assert (data_config.num_frames, data_config.image_size) == (2, 16)
        seen.extend((m.frames.shape, int(m.frames.mean()), q, modality) for m, q in zip(media_list, questions))
        audio.extend(None if m.audio is None else m.audio.shape for m in media_list)
        return [f"answer {q.split()[1][:-1]}" for q in questions]

    # String targets: a module that fails to import, or lacks the name, fails the test.
    monkeypatch.setattr("avllm_jax.inference.prompts.answer_questions", answer_questions)
    monkeypatch.setattr("avllm_jax.checkpoint.load_model", lambda path: "model")
    monkeypatch.setattr("avllm_jax.inference.generate.replicate", lambda model, mesh: f"{model} copied onto the mesh")
    monkeypatch.setattr("avllm_jax.data.conversation.load_tokenizer", lambda path: "tokenizer")

    def inference_data_config(model, checkpoint, **overrides):
        from avllm_jax.data.pipeline import default_data_config

        config = default_data_config()
        config.update(overrides, audio_sample_rate=16000)
        return config

    monkeypatch.setattr("avllm_jax.inference.prompts.inference_data_config", inference_data_config)
    answer_fn = evaluate.model_answer_fn(
        "ckpt", media_settings=dict(num_frames=2, num_audio_segments=4, image_size=16), max_new_tokens=5
    )
    summary = run_evaluation("msrvtt_qa", data, media, tmp_path / "out", answer_fn, batch_size=4)

    assert summary["counts"]["answered"] == 2 and summary["metrics"]["exact_match"]["accuracy"] == 1.0
    assert [p["kind"] for p in summary["problems"]] == ["answer_failed"]
    assert "MediaError" in summary["problems"][0]["detail"] and "video2.mp4" in summary["problems"][0]["detail"]
    # Decoded at the requested size; the task forces no modality, so the files' streams decide.
    assert [(shape, q, modality) for shape, _, q, modality in seen] == [
        ((2, 16, 16, 3), "question 0?", None),
        ((2, 16, 16, 3), "question 1?", None),
    ]
    assert abs(seen[0][1] - 40) <= 3 and abs(seen[1][1] - 80) <= 3  # each question got its own video
    # Resampled to the config's 16 kHz (AAC adds a few hundred samples of padding), in 4 segments.
    assert audio[1] is None and audio[0][0] == 4 and abs(audio[0][0] * audio[0][1] - 16000) < 1000


# -- several processes ---------------------------------------------------------------------------


class FakeStore:
    """The coordination service's key-value store, in memory, for processes played by threads."""

    def __init__(self):
        self.values, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            assert allow_overwrite or key not in self.values, f"{key} set twice"
            self.values[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]

    def key_value_delete(self, key):
        with self.lock:
            del self.values[key]


def run_processes(count, run, timeout_s=30.0):
    """`run(group)` in `count` threads, one ProcessGroup each over one FakeStore; their results."""
    from avllm_jax.evaluation.processes import ProcessGroup

    store, results = FakeStore(), [None] * count

    def target(index):
        results[index] = run(ProcessGroup(index, count, store, timeout_s))

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_processes_split_the_questions_and_the_leader_writes_what_one_process_writes(tmp_path, judge):
    records = qa_records(9)
    data, media = write_msrvtt(tmp_path, records, [f"video{i}.mp4" for i in range(9) if i != 4])  # 4: missing media
    answers = {f"question {i}?": f"answer {i}" if i % 2 else "no idea" for i in range(9)}
    alone = run_evaluation(
        "msrvtt_qa",
        data,
        media,
        tmp_path / "alone",
        scripted_answers(answers),
        judge=judge.client(),
        checkpoint="ckpt",
        batch_size=2,
    )

    # Resume too: the cache already holds two answers, which nobody asks again.
    shared = tmp_path / "shared"
    shared.mkdir()
    lines = (tmp_path / "alone" / report.PREDICTIONS_FILE).read_text().splitlines()
    (shared / report.PREDICTIONS_FILE).write_text("\n".join(lines[:2]) + "\n")
    (shared / report.RUN_FILE).write_text((tmp_path / "alone" / report.RUN_FILE).read_text())
    asked = [scripted_answers(answers) for _ in range(3)]
    summaries = run_processes(
        3,
        lambda group: run_evaluation(
            "msrvtt_qa",
            data,
            media,
            shared,
            asked[group.index],
            judge=judge.client(),
            checkpoint="ckpt",
            batch_size=2,
            group=group,
        ),
    )

    assert summaries[1:] == [None, None] and summaries[0] == alone
    shares = [sorted(q for call in a.calls for q in call) for a in asked]
    assert all(shares) and sorted(sum(shares, [])) == [f"question {i}?" for i in (2, 3, 5, 6, 7, 8)]
    for name in (report.SUMMARY_MD, report.PER_QUESTION_FILE):
        assert (shared / name).read_text() == (tmp_path / "alone" / name).read_text()
    key = lambda r: r["id"]
    assert sorted(report.read_jsonl(shared / report.PREDICTIONS_FILE)[0], key=key) == sorted(
        report.read_jsonl(tmp_path / "alone" / report.PREDICTIONS_FILE)[0], key=key
    )


def test_a_silent_process_costs_only_its_share_and_waits_are_bounded(tmp_path):
    from avllm_jax.evaluation.processes import ProcessGroup, ProcessGroupError

    data, media = write_msrvtt(tmp_path, qa_records(4), [f"video{i}.mp4" for i in range(4)])
    answers = {f"question {i}?": f"answer {i}" for i in range(4)}
    start = time.monotonic()
    # Process 1 of 2 never answers: after 1 s without a word from it, the leader scores the rest.
    summary = run_evaluation(
        "msrvtt_qa",
        data,
        media,
        tmp_path / "out",
        scripted_answers(answers),
        batch_size=1,
        group=ProcessGroup(0, 2, FakeStore(), timeout_s=1.0),
    )
    assert time.monotonic() - start < 20
    assert summary["counts"]["answered"] == 2 and summary["counts"]["answer_failed"] == 2
    assert {p["id"]: p["detail"] for p in summary["problems"]} == {
        "1": "process 1 sent no answers for 1 s",
        "3": "process 1 sent no answers for 1 s",
    }
    # The rerun, with both processes, asks only for those two.
    asked = [scripted_answers(answers) for _ in range(2)]
    summaries = run_processes(
        2,
        lambda group: run_evaluation(
            "msrvtt_qa", data, media, tmp_path / "out", asked[group.index], batch_size=1, group=group
        ),
    )
    assert summaries[0]["counts"]["answered"] == 4 and summaries[0]["problems"] == []
    assert sorted(q for a in asked for call in a.calls for q in call) == ["question 1?", "question 3?"]
    # A process whose leader never comes gives up with a message.
    start = time.monotonic()
    with pytest.raises(ProcessGroupError, match="process 1 of 2 waited 1 s for the list of unanswered samples"):
        run_evaluation(
            "msrvtt_qa",
            data,
            media,
            tmp_path / "other",
            scripted_answers(answers),
            group=ProcessGroup(1, 2, FakeStore(), timeout_s=1.0),
        )
    assert time.monotonic() - start < 20 and not (tmp_path / "other").exists()


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    """A tiny random model saved as a workdir (media settings it takes in data_config.json),
    and an MSRVTT-style benchmark over real clips: video with sound, silent video, sound alone.
    Its weights are large, so that its answers differ from one question to the next."""
    import jax
    import numpy as np
    from flax import nnx
    from tiny_models import tiny_model, tiny_tokenizer

    from avllm_jax import checkpoint
    from avllm_jax.data.media import write_media
    from avllm_jax.data.pipeline import default_data_config

    root = tmp_path_factory.mktemp("benchmark")
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: np.asarray(x) + rng.normal(0, 1.0, x.shape).astype(np.float32), nnx.to_pure_dict(nnx.state(model))
    )
    checkpoint.save_params(str(root / "model" / checkpoint.PARAMS_DIR), params)
    checkpoint.write_model_config(str(root / "model"), model.config)
    tokenizer.save_pretrained(root / "model")
    data_config = default_data_config()
    data_config.update(
        num_frames=2, image_size=32, num_audio_segments=2, audio_max_length_s=0.4, audio_truncation="rand_trunc"
    )
    checkpoint.write_data_config(str(root / "model"), data_config)
    media = root / "media"
    media.mkdir()
    for i in range(6):
        frames = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8) if i % 3 != 2 else None
        tone = (
            (0.3 * np.sin(2 * np.pi * (300 + 100 * i) * np.arange(48000) / 48000)).astype(np.float32) if i % 3 else None
        )
        write_media(
            media / (f"video{i}.mp4" if frames is not None else f"video{i}.flac"),
            frames=frames,
            fps=6,
            audio=tone,
            **({} if frames is not None else {"audio_codec": "flac"}),
        )
    questions = [
        "What colour is the square?",
        "How many beeps do you hear?",
        "Is the tone high?",
        "Does the circle move left?",
        "Is the sound low?",
        "What moves up?",
        "What colour is the circle?",
        "Is the triangle high?",
        "What do you hear?",
    ]
    records = [{"id": i, "video_id": i % 6, "question": q, "answer": "red"} for i, q in enumerate(questions)]
    (root / "qa.json").write_text(json.dumps(records))
    return root


def evaluate_command(root, out, *extra):
    import sys

    return [
        sys.executable,
        "-m",
        "avllm_jax.evaluate",
        "--checkpoint",
        str(root / "model"),
        "--task",
        "msrvtt_qa",
        "--data",
        str(root / "qa.json"),
        "--media-root",
        str(root / "media"),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "4",
        *extra,
    ]


def test_two_processes_give_what_one_gives(tiny_benchmark, tmp_path):
    """The real command line: one process over 2 devices, then 2 processes of 1 device each
    (gloo on 127.0.0.1), which split the questions; process 0 writes the same files."""
    import subprocess

    from training_runs import environment, free_port

    one = tmp_path / "one"
    result = subprocess.run(
        evaluate_command(tiny_benchmark, one), env=environment(2), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    port = free_port()
    two = tmp_path / "two"
    processes = [
        subprocess.Popen(
            evaluate_command(
                tiny_benchmark,
                two,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--distributed_timeout_s=120",
            ),
            env=environment(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=600) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "answering (process 1 of 2): 100%|██████████| 4/4" in outputs[1][1]  # questions 1, 3, 5, 7
    assert "process 1 of 2: answered its share; process 0 writes" in outputs[1][0]
    assert "exact_match accuracy" in outputs[0][0] and "exact_match" not in outputs[1][0]

    summary = json.loads((one / report.SUMMARY_JSON).read_text())
    assert summary["counts"]["answered"] == 9 and not summary["problems"]
    assert json.loads((two / report.SUMMARY_JSON).read_text()) == summary
    assert (two / report.PER_QUESTION_FILE).read_text() == (one / report.PER_QUESTION_FILE).read_text()
    predictions = [sorted(report.read_jsonl(d / report.PREDICTIONS_FILE)[0], key=lambda r: r["id"]) for d in (one, two)]
    assert predictions[0] == predictions[1]
    answers = [r["predictions"][0] for r in predictions[0]]
    print("2 processes = 1 process:", answers)
    assert len(set(answers)) >= 3  # answers that differ, so that a mix-up would show


def test_the_command_line_fails_when_every_answer_fails_and_lists_the_first_failures(tmp_path, monkeypatch, capsys):
    """All failing is an error (exit 1); some failing is a warning, or an error past
    --max-failed-fraction; missing media do not count as failures."""
    from avllm_jax import evaluate

    data, media = write_msrvtt(tmp_path, qa_records(8), [f"video{i}.mp4" for i in range(7)])  # video7: missing
    failing = set()

    def model_answer_fn(checkpoint, **settings):
        def answer(batch):
            if any(q.question in failing for q in batch):
                raise ValueError(f"CLIP expects 32x32 pixels, got 64x64 in {batch[0].media_path}")
            return ["an answer"] * len(batch)

        return answer

    monkeypatch.setattr(evaluate, "model_answer_fn", model_answer_fn)

    model = config_only_model(tmp_path)

    def run(out, *extra):
        argv = [
            "--checkpoint",
            model,
            "--task",
            "msrvtt_qa",
            "--data",
            str(data),
            "--media-root",
            str(media),
            "--out",
            str(tmp_path / out),
            *extra,
        ]
        try:
            evaluate.main(argv)
            code = 0
        except SystemExit as exit:
            code = exit.code
        return code, capsys.readouterr().err

    failing.update(f"question {i}?" for i in range(7))
    code, err = run("all")
    assert code == 1
    assert (
        "error: 7 of 7 samples failed (100%); the first:\n  0: answer_failed: " in err
        and "CLIP expects 32x32 pixels, got 64x64" in err
    )
    assert err.count("answer_failed") == 5 and "... and 2 more in summary.json" in err

    failing.clear()
    failing.add("question 3?")
    code, err = run("one")
    assert code == 0 and re.search(
        r"warning: 1 of 7 samples failed \(14%\); the first:\n  3: answer_failed: \S+video3.mp4: ValueError: CLIP", err
    )
    code, err = run("strict", "--max-failed-fraction", "0.1")
    assert code == 1 and "error: 1 of 7 samples failed (14%)" in err

    failing.clear()
    code, err = run("none", "--max-failed-fraction", "0")
    assert code == 0 and "failed" not in err


def test_jsonl_task_scores_exact_match_and_asks_each_sample_in_its_modality(tmp_path):
    from avllm_jax.modality import Modality

    (tmp_path / "media").mkdir()
    for name in ("dog.mp4", "rain.flac"):
        (tmp_path / "media" / name).write_bytes(b"")  # never decoded: the stand-in model reads the question
    samples = [
        ("v1", "video", "media/dog.mp4", "<AUD_VIS>", "What barks?", "The dog."),
        ("a1", "audio", "media/rain.flac", "<AUD>", "What falls?", "Rain."),
    ]
    data = tmp_path / "held_out.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(
                {
                    "id": i,
                    key: path,
                    "conversations": [{"from": "human", "value": f"{token}\n{q}"}, {"from": "gpt", "value": a}],
                }
            )
            for i, key, path, token, q, a in samples
        )
    )
    asked = []

    def answer_fn(batch):
        asked.extend((q.question, q.modality, q.media_path) for q in batch)
        return ["the dog" if "barks" in q.question else "snow" for q in batch]

    summary = run_evaluation("jsonl", data, tmp_path, tmp_path / "out", answer_fn)
    assert sorted(asked) == [
        ("What barks?", Modality.AUDIO_VISUAL, str(tmp_path / "media" / "dog.mp4")),
        ("What falls?", Modality.AUDIO, str(tmp_path / "media" / "rain.flac")),
    ]
    assert summary["metrics"]["exact_match"] == {"accuracy": 0.5, "n": 2}
