"""CIDEr-D on worked examples computed by hand, exact-match normalisation, SPICE availability;
the training log line and its TensorBoard row on known inputs."""

import logging
import math
import os
import stat
import sys
import types

import numpy as np
import pytest

from avllm_jax.evaluation import metrics
from avllm_jax.training import metrics as training_metrics

L = math.log(2.0)  # the IDF of an n-gram found in the references of 1 of 2 clips: log(2 / 1)


def test_exact_match_normalises_case_punctuation_articles():
    assert metrics.normalize_answer("  The Dog,  is BARKING! ") == "dog is barking"
    assert metrics.exact_match("A cat.", ["dog", "the cat"])
    assert not metrics.exact_match("a black cat", ["cat"])
    assert not metrics.exact_match("", ["cat"])


def test_cider_d_identical_and_repeated_word():
    # Two clips, references A: "a b", B: "c d". Every reference n-gram is in 1 of 2 clips: IDF = L.
    # Clip A, candidate "a b" (same as its reference, same length, penalty 1):
    #   n=1: g(c) = g(s) = {a: L, b: L}: <min, g(s)> = 2L^2, norms sqrt(2)L * sqrt(2)L = 2L^2 -> 1
    #   n=2: {ab: L} both -> 1;   n=3, 4: no n-grams -> 0
    #   CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5
    # Clip B, candidate "c c" (length 2 = reference length, penalty 1):
    #   n=1: g(c) = {c: 2L}, g(s) = {c: L, d: L}; min(2L, L) * L = L^2; norms 2L * sqrt(2)L
    #        -> 1 / (2 sqrt 2);   n=2: {cc} vs {cd} -> 0
    #   CIDEr-D = 10 * (1 / (2 sqrt 2)) / 4 = 10 / (8 sqrt 2)
    corpus, per_clip = metrics.cider_d(["a b", "c c"], [["a b"], ["c d"]])
    assert per_clip[0] == pytest.approx(5.0, rel=1e-12)
    assert per_clip[1] == pytest.approx(10 / (8 * math.sqrt(2)), rel=1e-12)
    assert corpus == pytest.approx((5.0 + 10 / (8 * math.sqrt(2))) / 2, rel=1e-12)


def test_cider_d_length_penalty_and_clipping():
    # Clip A reference "a b"; candidate "a b a b a b a b": 8 words vs 2, penalty exp(-36 / 72).
    #   n=1: g(c) = {a: 4L, b: 4L}, g(s) = {a: L, b: L}; clipped <min, g(s)> = 2L^2;
    #        norms sqrt(32)L * sqrt(2)L = 8L^2 -> 1/4
    #   n=2: g(c) = {ab: 4L, ba: 3L} (norm 5L), g(s) = {ab: L}; L * L / (5L * L) -> 1/5
    #   n=3: the reference has no trigram -> 0
    #   CIDEr-D = 10 * exp(-0.5) * (1/4 + 1/5) / 4 = 1.125 * exp(-0.5)
    # Clip B ("c d" vs reference "c d") only supplies the IDF.
    _, per_clip = metrics.cider_d(["a b a b a b a b", "c d"], [["a b"], ["c d"]])
    assert per_clip[0] == pytest.approx(1.125 * math.exp(-0.5), rel=1e-12)


def test_cider_d_idf_and_reference_average():
    # Clip A references "a b" and "a c", clip B reference "a d". "a" is in both clips' references:
    # IDF log(2/2) = 0, so it weighs nothing. Candidate for A "a b" (length 2 = both references):
    #   vs "a b": n=1 g(c) = g(s) = {a: 0, b: L} -> L^2 / (L * L) = 1;  n=2 {ab: L} both -> 1
    #   vs "a c": n=1 {a: 0, b: L} . {a: 0, c: L} = 0;  n=2 {ab} vs {ac} -> 0
    #   CIDEr-D = 10 / m * sum_j (sum_n ...) / 4 = 10 / 2 * (2 / 4 + 0) = 2.5
    _, per_clip = metrics.cider_d(["a b", "a d"], [["a b", "a c"], ["a d"]])
    assert per_clip[0] == pytest.approx(2.5, rel=1e-12)


def test_cider_d_tokenisation_and_bad_input():
    # Case and punctuation do not matter: "A, B!" is the caption "a b".
    assert metrics.cider_d(["A, B!", "c d"], [["a b"], ["C D."]])[1][0] == pytest.approx(5.0)
    # An empty candidate has no n-grams and scores 0.
    assert metrics.cider_d(["", "c d"], [["a b"], ["c d"]])[1][0] == 0.0
    with pytest.raises(ValueError, match="reference"):
        metrics.cider_d(["a"], [[]])
    with pytest.raises(ValueError, match="2 candidates"):
        metrics.cider_d(["a", "b"], [["a"]])


def test_spice_unavailable_without_java_or_jar(monkeypatch, tmp_path):
    monkeypatch.delenv("SPICE_JAR", raising=False)
    assert metrics.spice(["a"], [["a"]]) == metrics.SPICE_UNAVAILABLE
    monkeypatch.setenv("SPICE_JAR", str(tmp_path / "absent.jar"))
    assert metrics.spice(["a"], [["a"]]) == metrics.SPICE_UNAVAILABLE


def test_spice_reads_the_jar_output(monkeypatch, tmp_path):
    # A stand-in `java` that behaves like the SPICE jar's command line: reads the request,
    # writes per-clip F-scores (1.0 when the candidate equals a reference, else 0.25).
    fake_java = tmp_path / "java"
    fake_java.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "request = json.load(open(args[args.index('-jar') + 2]))\n"
        "out = [{'image_id': r['image_id'], 'scores': {'All': {'f': 1.0 if r['test'] in r['refs'] else 0.25}}}\n"
        "       for r in request]\n"
        "json.dump(out, open(args[args.index('-out') + 1], 'w'))\n"
    )
    fake_java.chmod(fake_java.stat().st_mode | stat.S_IEXEC)
    jar = tmp_path / "spice-1.0.jar"
    jar.write_bytes(b"")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SPICE_JAR", str(jar))
    corpus, per_clip = metrics.spice(["a b", "x"], [["a b"], ["c d"]])
    assert per_clip == [1.0, 0.25]
    assert corpus == pytest.approx(0.625)


class RecordingWriter:
    def __init__(self):
        self.rows = []

    def write_scalars(self, step, scalars):
        self.rows.append((step, dict(scalars)))


def step_metrics(loss, visual, audio_visual, grad_norm=0.5, tokens=80):
    nan = float("nan")  # a loss group absent from the step's batch
    return {
        "loss": np.float32(loss),
        "grad_norm": np.float32(grad_norm),
        "target_tokens": np.int32(tokens),
        "loss/visual": np.float32(visual),
        "loss/audio": np.float32(nan),
        "loss/audio_visual": np.float32(audio_visual),
        "loss/text": np.float32(nan),
        "work": np.array([3.0, 4.0, 0, 0, 0, 0], np.float32),  # 3 samples, 4 LLM tokens
    }


def test_training_log_line_and_row(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="avllm_jax")
    clock = [100.0]
    monkeypatch.setattr(training_metrics.time, "time", lambda: clock[0])
    writer = RecordingWriter()
    # Useful work: 1 TFLOP per LLM token (the work vector's second entry); each step's slots: 5 TFLOP.
    log = training_metrics.MetricsLog(
        writer,
        useful_flops=lambda work: work[1] * 1e12,
        slot_flops_per_step=5e12,
        peak_flops=10e12,
        num_devices=2,
        total=100,
        start_step=10,
    )
    nan = float("nan")
    for step in range(11, 21):  # losses 2 and 3 alternate; visual on even steps, audio_visual on odd
        even = step % 2 == 0
        log.add(
            step_metrics(2.0 if even else 3.0, 2.0 if even else nan, nan if even else 3.0),
            {"num_skipped_media": 1 if step == 11 else 0, "num_rerouted": 1 if step in (12, 13) else 0},
        )
    clock[0] = 105.0  # 10 steps in 5 s
    row = log.flush(20, learning_rate=1e-3)
    line = caplog.messages[-1].strip()
    # 10 steps / 5 s; 800 answer tokens / 5 s; 10 steps * 4 TFLOP of useful work / 5 s / 2
    # devices = 4 TFLOP/s, 40% of 10 (slots: 10 * 5 TFLOP / 5 s / 2 = 5 TFLOP/s, 50%);
    # eta 5 s / 10 steps * 80 steps left = 40 s.
    assert line == (
        "step 20/100 | loss 2.5000 (visual 2.0000, audio_visual 3.0000) | lr 1.00e-03 | grad norm 0.5"
        " | 2.00 steps/s, 6.0 samples/s, 160 answer tok/s, 4.000 TFLOP/s/device, mfu 40.0% (slots 50.0%) | eta 0m40s"
        " | skipped_media 1, skipped_text 0, rerouted 2, truncated 0"
    )
    assert writer.rows == [(20, row)]
    assert "loss/audio" not in row and "loss/text" not in row
    assert (
        row["data/num_rerouted"] == 2.0
        and row["target_tokens_per_second"] == 160.0
        and row["mfu"] == pytest.approx(0.4)
    )

    # The counts are totals; without a known device peak MFU is n/a; a step that had text only.
    log.peak_flops = None
    log.add(step_metrics(1.0, nan, nan) | {"loss/text": np.float32(1.0)}, {"num_skipped_text": 3})
    clock[0] = 106.0
    log.flush(21, learning_rate=5e-4)
    line = caplog.messages[-1].strip()
    assert "loss 1.0000 (text 1.0000) | lr 5.00e-04" in line and "mfu n/a" in line
    assert line.endswith("| skipped_media 1, skipped_text 3, rerouted 2, truncated 0")


def test_goodput_times_a_later_run_of_the_process_from_its_own_start(monkeypatch, tmp_path):
    """tools/demo.py trains stage 1 and stage 2 in one process: the second run's start-up is its
    own set-up, not the first run's whole wall time."""
    from avllm_jax.training import goodput

    clock = {"now": 1000.0}
    monkeypatch.setattr(goodput, "time", types.SimpleNamespace(time=lambda: clock["now"]))
    monkeypatch.setattr(goodput, "process_start_time", lambda: 900.0)
    monkeypatch.setattr(goodput, "_first_run_of_process", True)
    first = goodput.Goodput(str(tmp_path / "stage1"), writes_record=False)
    clock["now"] = 1010.0
    first.loop_starts(0)
    assert first.seconds["startup"] == 110.0  # the process's imports count for the first run
    clock["now"] = 2000.0  # the first run trained for 990 s
    second = goodput.Goodput(str(tmp_path / "stage2"), writes_record=False)
    clock["now"] = 2005.0
    second.loop_starts(0)
    assert second.seconds["startup"] == 5.0
