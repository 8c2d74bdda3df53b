"""Running `python -m avllm_jax.train` in subprocesses on the demo data, for the end-to-end tests."""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

import avllm_jax
from avllm_jax.data import conversation, synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 6, 2


def make_demo_files(root):
    """24 demo clips and a tokenizer under `root`."""
    synthetic.make_demo_split(root / "data", "train", 24, seed=0)
    conversation.train_tokenizer(synthetic.demo_tokenizer_corpus(), vocab_size=700).save_pretrained(root / "tokenizer")
    return root


def train_command(demo_files, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "avllm_jax.train",
        "--config",
        str(REPO / "configs/demo.py"),
        "--workdir",
        str(workdir),
        f"--config.tokenizer={demo_files / 'tokenizer'}",
        f"--config.data.sources=({{'path': '{demo_files / 'data/train.jsonl'}', 'weight': 1.0}},)",
        f"--config.num_steps={STEPS}",
        f"--config.checkpoint_every={SAVE_EVERY}",
        "--config.keep_checkpoints=2",
        "--config.global_batch_size=4",
        "--config.log_every=1",
        "--config.data.worker_count=0",
        "--config.model.llm.hidden_size=32",
        "--config.model.llm.intermediate_size=64",
        "--config.model.llm.head_dim=8",
        # Packed as configs/demo.py, in packs of one or two samples (its longest is 103 positions).
        "--config.data.packing.rows=1",
        "--config.data.packing.row_length=112",
        "--config.data.packing.frames=8",
        "--config.data.packing.visual_items=2",
        "--config.data.packing.audio_clips=2",
        *extra,
    ]


def environment(devices=1):
    """The tests' environment (conftest.py sets the compilation cache and XLA's flags) with `devices` CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    other_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*other_flags, f"--xla_force_host_platform_device_count={devices}"])
    return env


def final_params(workdir):
    model = avllm_jax.load_model(workdir)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def max_difference(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


def wait_for_line(process, text, timeout_s):
    """Reads the process's stdout until a line holds `text`; False when it ends or time runs out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            return False
        if text in line:
            return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Unpacked: then the processes' batches side by side are the batch one process reads, so two
# processes must train exactly like one. Packed, each process packs its own samples
# (tests/test_packing.py checks they are disjoint and cover the data).
UNPACKED = "--config.data.packing.enabled=False"


def start_processes(demo_files, workdir, port, *extra, count=2, devices=2):
    """`count` training processes on this machine, `devices` CPU devices each, gloo collectives."""
    return [
        subprocess.Popen(
            train_command(
                demo_files,
                workdir,
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={count}",
                f"--process_id={index}",
                "--distributed_timeout_s=120",
                *extra,
            ),
            env=environment(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(count)
    ]


def finish(processes, timeout_s=600) -> list[tuple[int, str]]:
    """(exit status, output) of each process, once all have ended; any left after `timeout_s` are killed."""
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=timeout_s)
            results.append((process.returncode, output))
    finally:
        for process in processes:
            process.kill()
    return results
