"""`python -m avllm_jax.train` end to end: exact resume after a kill, load_model on a workdir,
and a clear message when the converted checkpoint is missing."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import avllm_jax
from avllm_jax.data import conversation, synthetic
from avllm_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 6, 2


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    synthetic.make_demo_split(root / "data", "train", 24, seed=0)
    conversation.train_tokenizer(synthetic.demo_tokenizer_corpus(), vocab_size=700).save_pretrained(root / "tokenizer")
    return root


def train_command(demo_files, workdir, *extra):
    return [
        sys.executable, "-m", "avllm_jax.train", "--config", str(REPO / "configs/demo.py"), "--workdir", str(workdir),
        f"--config.tokenizer={demo_files / 'tokenizer'}",
        f"--config.data.sources=({{'path': '{demo_files / 'data/train.jsonl'}', 'weight': 1.0}},)",
        f"--config.num_steps={STEPS}", f"--config.checkpoint_every={SAVE_EVERY}", "--config.keep_checkpoints=2",
        "--config.global_batch_size=4", "--config.log_every=1", "--config.data.worker_count=0",
        "--config.model.llm.hidden_size=32", "--config.model.llm.intermediate_size=64", "--config.model.llm.head_dim=8",
        *extra,
    ]


def environment():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def final_params(workdir):
    model = avllm_jax.load_model(workdir)
    from flax import nnx

    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def test_killed_run_resumes_exactly(demo_files, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run(train_command(demo_files, uninterrupted), check=True, env=environment(), capture_output=True)

    # Kill the second run with SIGKILL while it writes a checkpoint after the first one.
    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(demo_files, killed), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed / checkpoint.CHECKPOINTS_DIR
    killed_while_saving = False
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        entries = os.listdir(checkpoints) if checkpoints.exists() else []
        finished = [e for e in entries if e.isdigit()]
        if finished and any("tmp" in e for e in entries):
            process.send_signal(signal.SIGKILL)
            killed_while_saving = True
            break
        time.sleep(0.005)
    process.wait()
    assert killed_while_saving, "the run ended before a save could be interrupted"
    step = checkpoint.latest_step(str(killed))
    assert step is not None and step < STEPS
    avllm_jax.load_model(killed)  # the last good checkpoint loads

    result = subprocess.run(train_command(demo_files, killed), check=True, env=environment(), capture_output=True, text=True)
    assert f"resumed from step {step}" in result.stdout
    expected, resumed = final_params(uninterrupted), final_params(killed)
    worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), expected, resumed)))
    print(f"resume after kill at step {step}: max |param diff| = {worst:.2e}")
    assert worst <= 1e-6


def test_sft_without_converted_checkpoint_says_how_to_make_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "avllm_jax.train", "--config", str(REPO / "configs/sft.py"), "--workdir", str(tmp_path / "run"),
         f"--config.init_checkpoint={tmp_path / 'nowhere'}"],
        env=environment(), capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "does not exist" in result.stderr and "configs/pretrain.py" in result.stderr and "convert_hf_weights.py" in result.stderr
