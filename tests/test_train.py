"""`python -m avllm_jax.train` end to end: exact resume after a kill and after SIGTERM (with data
worker processes), load_model on a workdir, and clear messages when a converted checkpoint or
the coordinator is missing. Several processes and resuming on another layout: test_elastic.py."""

import os
import signal
import subprocess
import sys
import time

import pytest
from training_runs import (
    REPO,
    STEPS,
    environment,
    final_params,
    free_port,
    make_demo_files,
    max_difference,
    train_command,
    wait_for_line,
)

import avllm_jax
from avllm_jax import checkpoint


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    return make_demo_files(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def uninterrupted(demo_files, tmp_path_factory):
    """The final parameters of a run that nothing stops (one process, one device)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(train_command(demo_files, workdir), check=True, env=environment(), capture_output=True, timeout=600)
    return final_params(workdir)


def test_killed_run_resumes_exactly(demo_files, uninterrupted, tmp_path):
    # Kill the second run with SIGKILL while it writes a checkpoint after the first one.
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        train_command(demo_files, killed), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
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

    result = subprocess.run(
        train_command(demo_files, killed), check=True, env=environment(), capture_output=True, text=True
    )
    assert f"resumed from step {step}" in result.stdout
    worst = max_difference(uninterrupted, final_params(killed))
    print(f"resume after kill at step {step}: max |param diff| = {worst:.2e}")
    assert worst <= 1e-6


def test_sigterm_saves_the_step_and_resumes_exactly_with_data_workers(demo_files, uninterrupted, tmp_path):
    workdir = tmp_path / "preempted"
    command = train_command(demo_files, workdir, "--config.data.worker_count=1", "--config.checkpoint_every=100")
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for_line(process, "step 2/", timeout_s=300), "the run ended before step 2"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, output
    stopped = int(output.split("preempted: saved step ")[1].split()[0])
    assert 2 <= stopped < STEPS and checkpoint.latest_step(str(workdir)) == stopped
    assert (workdir / checkpoint.CHECKPOINTS_DIR / str(stopped)).is_dir()

    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {stopped}" in result.stdout
    worst = max_difference(uninterrupted, final_params(workdir))
    print(f"SIGTERM at step {stopped}, resumed with a data worker: max |param diff| = {worst:.2e}")
    assert worst <= 1e-6


def test_unreachable_coordinator_is_a_clear_error_in_bounded_time(demo_files, tmp_path):
    start = time.time()
    result = subprocess.run(
        train_command(
            demo_files,
            tmp_path / "run",
            f"--coordinator_address=127.0.0.1:{free_port()}",
            "--num_processes=2",
            "--process_id=1",
            "--distributed_timeout_s=3",
        ),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "process 1 of 2 could not reach the coordinator at 127.0.0.1:" in result.stderr
    assert time.time() - start < 60


def test_sft_without_converted_checkpoint_says_how_to_make_it(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "avllm_jax.train",
            "--config",
            str(REPO / "configs/sft.py"),
            "--workdir",
            str(tmp_path / "run"),
            f"--config.init_checkpoint={tmp_path / 'nowhere'}",
        ],
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        "does not exist" in result.stderr
        and "configs/pretrain.py" in result.stderr
        and "convert_hf_weights.py" in result.stderr
    )
