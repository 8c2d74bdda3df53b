"""lmms-eval itself (its own environment, `make lmms-eval`) scores a tiny checkpoint through the
`avllm_jax` model on two local tasks this test writes: open answers (exact match) and multiple
choice (the answer's option), over a video with sound, one without and an audio clip that
lmms-eval hands as an array. Which answers are right is set here from the chat command's
answers, so the scores are known before lmms-eval runs: 2 of 4 and 2 of 3."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from test_chat import write_converted_model

from avllm_jax import chat
from avllm_jax.data.media import write_media

REPO = pathlib.Path(__file__).resolve().parent.parent
LMMS_EVAL = REPO / ".venv-lmms" / "bin" / "lmms-eval"
NUM_FRAMES, MAX_NEW = 4, 12

TASK_UTILS = """
import wave

import numpy as np


def doc_to_visual(doc):
    if not doc["media"].endswith(".wav"):
        return [doc["media"]]  # lmms-eval hands videos as paths
    with wave.open(doc["media"]) as f:  # and audio as arrays
        samples = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768
        return [{"array": samples, "sampling_rate": f.getframerate()}]


def doc_to_text(doc):
    return doc["question"]


def exact(doc, results):
    return {"exact": float(results[0].strip() == doc["answer"])}


def chosen_option(doc, results):
    chosen = next((letter for letter, text in doc["options"].items() if text == results[0].strip()), None)
    return {"accuracy": float(chosen == doc["answer"])}
"""


def task_yaml(name: str, data: pathlib.Path, scorer: str, metric: str) -> str:
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW}
  temperature: 0
  do_sample: false
process_results: !function utils.{scorer}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
"""


def chat_answer(checkpoint, media, question):
    argv = ["--checkpoint", str(checkpoint), "--media", str(media), "--question", question]
    return chat.main([*argv, "--num-frames", str(NUM_FRAMES), "--max-new-tokens", str(MAX_NEW)])[0]


@pytest.mark.skipif(not LMMS_EVAL.exists(), reason="lmms-eval's environment is missing: run `make lmms-eval`")
def test_lmms_eval_scores_what_the_answers_earn(tmp_path):
    checkpoint = write_converted_model(tmp_path)
    frames = np.zeros((8, 48, 48, 3), np.uint8)
    for t in range(8):
        frames[t, 16:32, 4 * t : 4 * t + 16, 0] = 255
    tone = (0.3 * np.sin(2 * np.pi * 660 * np.arange(48000) / 48000)).astype(np.float32)
    write_media(tmp_path / "sound.mp4", frames=frames, audio=tone)
    write_media(tmp_path / "silent.mp4", frames=frames[:, ::-1])
    write_media(tmp_path / "tone.wav", audio=tone, audio_codec="pcm_s16le")
    asked = [
        (tmp_path / "sound.mp4", "What colour is the square?"),
        (tmp_path / "silent.mp4", "Which way does it move?"),
        (tmp_path / "tone.wav", "What do you hear?"),
        (tmp_path / "silent.mp4", "How many squares are there?"),
    ]
    answers = [chat_answer(checkpoint, media, question) for media, question in asked]
    assert all(answers) and "never said" not in answers

    # Open answers: docs 0 and 2 are answered right, 1 and 3 wrong.
    open_docs = [
        {"media": str(media), "question": q, "answer": a if i in (0, 2) else "never said"}
        for i, ((media, q), a) in enumerate(zip(asked, answers))
    ]
    # Multiple choice: the answer is option C of each doc; the key says C for docs 0 and 1, B for 2.
    mc_docs = [
        {
            "media": str(media),
            "question": q,
            "options": {"A": "never said", "B": "a red square", "C": a, "D": "silence"},
            "answer": "C" if i < 2 else "B",
        }
        for i, ((media, q), a) in enumerate(zip(asked[:3], answers[:3]))
    ]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    for name, docs, scorer, metric in (
        ("avllm_open", open_docs, "exact", "exact"),
        ("avllm_mc", mc_docs, "chosen_option", "accuracy"),
    ):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (tasks / f"{name}.yaml").write_text(task_yaml(name, data, scorer, metric))

    env = dict(
        os.environ,
        AVLLM_JAX_PYTHON=sys.executable,
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        WANDB_MODE="disabled",
    )
    env.pop("VIRTUAL_ENV", None)
    model_args = f"checkpoint={checkpoint},num_frames={NUM_FRAMES},concurrency=4"
    command = [str(LMMS_EVAL), "--model", "avllm_jax", "--model_args", model_args, "--tasks", "avllm_open,avllm_mc"]
    command += ["--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--batch_size", "1"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    written = list((tmp_path / "out").rglob("*results.json"))  # lmms-eval exits 0 after an error too
    assert written, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads(written[0].read_text())["results"]
    assert results["avllm_open"]["exact,none"] == pytest.approx(2 / 4)
    assert results["avllm_mc"]["accuracy,none"] == pytest.approx(2 / 3)
