"""What `python -m avllm_jax.train` does when things go wrong: each failure is a message of a
line or two naming what and where, given before any expensive work where it can be, and the
newest complete checkpoint stays loadable (README, "When things go wrong")."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from training_runs import environment, make_demo_files, train_command, wait_for_line

import avllm_jax
from avllm_jax import checkpoint


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    return make_demo_files(tmp_path_factory.mktemp("demo"))


def run(command, timeout=600):
    return subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout)


def catches_sigusr1(pid):
    """Whether the process has a SIGUSR1 handler (Linux's /proc): before it has, SIGUSR1 kills it."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (signal.SIGUSR1 - 1) & 1)


def assert_short_error(result, *needles, code=1):
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr[-3000:])


@pytest.mark.parametrize(
    "extra, needles, code",
    [
        (["--config.optim.lr=1"], ["--config.optim.lr", "config.optim.lr is not a field", "learning_rate"], 2),
        (["--config.data.num_frame=2"], ["config.data.num_frame is not a field", "num_frames"], 2),
        (["--config.global_batch_size=6"], ["global_batch_size=6", "8 batch devices", "multiple of 8"], 1),
    ],
    ids=["unknown-field", "misspelt-data-field", "batch-the-mesh-does-not-divide"],
)
def test_config_mistakes_are_one_line_errors(demo_files, tmp_path, extra, needles, code):
    env = environment(devices=8)
    start = time.time()
    result = subprocess.run(
        train_command(demo_files, tmp_path / "run", *extra), env=env, capture_output=True, text=True, timeout=300
    )
    assert_short_error(result, *needles, code=code)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert time.time() - start < 120  # before the model is built or any data decoded


def test_missing_or_failing_config_file_and_unwritable_workdir(demo_files, tmp_path):
    command = train_command(demo_files, tmp_path / "run")
    missing = list(command)
    missing[missing.index("--config") + 1] = str(tmp_path / "nothere.py")
    assert_short_error(run(missing), "nothere.py", "No such file", code=2)

    failing = tmp_path / "failing.py"
    failing.write_text("def get_config():\n    return 1 / 0\n")
    broken = list(command)
    broken[broken.index("--config") + 1] = str(failing)
    assert_short_error(run(broken), "failing.py", "ZeroDivisionError", code=2)

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert_short_error(
        run(train_command(demo_files, a_file / "run")), "cannot write to the workdir", str(a_file / "run")
    )


def test_malformed_instruction_line_is_named(demo_files, tmp_path):
    source = tmp_path / "train.jsonl"
    lines = (demo_files / "data" / "train.jsonl").read_text().splitlines()
    lines[3] = lines[3][:-5]  # cut off the end of line 4
    source.write_text("\n".join(lines) + "\n")
    command = train_command(
        demo_files,
        tmp_path / "run",
        f"--config.data.sources=({{'path': '{source}', 'media_root': '{demo_files / 'data'}', 'weight': 1.0}},)",
    )
    assert_short_error(run(command), f"{source}:4: not valid JSON")

    # A line whose media path leaves the source's media_root, and a file with no samples at all.
    record = json.loads(lines[5])
    key = next(k for k in ("video", "audio", "image") if k in record)
    record[key] = "../" + record[key]
    lines[3] = json.dumps(record)
    source.write_text("\n".join(lines) + "\n")
    assert_short_error(
        run(command), f"{source}:4: media path '{record[key]}' lies outside media_root {demo_files / 'data'}"
    )
    source.write_text("\n\n")
    assert_short_error(run(command), f"{source}: no usable samples")


def test_data_error_keeps_the_last_checkpoint(demo_files, tmp_path):
    # Every third sample's media is broken: past max_bad_fraction the run stops with a
    # DataError, after it has saved some steps; the newest of them must be complete.
    data = tmp_path / "data"
    shutil.copytree(demo_files / "data", data)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    for record in records[::3]:
        media = next(key for key in ("video", "audio", "image") if key in record)
        (data / record[media]).write_bytes(b"not a media file")
    result = run(
        train_command(
            demo_files,
            tmp_path / "run",
            "--config.num_steps=40",
            "--config.checkpoint_every=1",
            f"--config.data.sources=({{'path': '{data / 'train.jsonl'}', 'weight': 1.0}},)",
            # The packer reads a window (32) ahead: the check starts once some steps are saved.
            "--config.data.min_samples_before_bad_check=100",
            "--config.data.max_bad_fraction=0.1",
        )
    )
    assert_short_error(result, "could not be used", "more than max_bad_fraction=0.1")
    saved = checkpoint.latest_step(str(tmp_path / "run"))
    assert saved is not None and saved >= 1, result.stdout[-2000:]
    assert not [e for e in os.listdir(tmp_path / "run" / "checkpoints") if "tmp" in e]
    avllm_jax.load_model(tmp_path / "run")
    # The samples dropped before the error are summed up, with the first reasons, on stdout
    # and in the workdir.
    summary = (tmp_path / "run" / "skipped_samples_process_0.txt").read_text()
    assert summary.startswith("samples skipped media: ") and f"{data / 'train.jsonl'}:" in summary
    assert summary.splitlines()[0] in result.stdout


def truncate_files(directory):
    for path in directory.rglob("*"):
        if path.is_file() and path.stat().st_size:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def test_damaged_newest_steps_fall_back_a_line_each_and_schedule_changes_need_a_flag(demo_files, tmp_path, caplog):
    workdir = tmp_path / "run"
    keep = "--config.keep_checkpoints=4"
    first = run(train_command(demo_files, workdir, "--config.num_steps=8", keep))
    assert first.returncode == 0, first.stderr[-3000:]
    assert checkpoint.latest_step(str(workdir)) == 8
    rerun = run(train_command(demo_files, workdir, "--config.num_steps=8", keep))
    assert rerun.returncode == 0 and "is finished: it saved step 8 of 8" in rerun.stdout

    extended = train_command(demo_files, workdir, "--config.num_steps=10", keep)
    assert_short_error(run(extended), "belongs to another schedule", "num_steps 8 -> 10", "--allow_new_schedule")

    # A truncated file in each item of the three newest steps: the arrays' data (which orbax
    # reads in many threads) and the data iterator's position.
    damaged = {8: "params/d", 6: "opt_state/d", 4: "data_iterator"}
    for step, item in damaged.items():
        truncate_files(workdir / "checkpoints" / str(step) / item)
    avllm_jax.load_model(workdir)  # chat and evaluation load the newest intact params
    err = caplog.text
    assert "checkpoint step 8" in err and "loaded step 6" in err

    resumed = run(extended + ["--allow_new_schedule"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    for noise in ("Traceback", "Event loop is closed", "Encountered error", "exception was never retrieved"):
        assert noise not in output, output[-3000:]
    fallbacks = [line for line in resumed.stderr.splitlines() if "cannot be restored" in line]
    assert [int(line.split("checkpoint step ")[1].split()[0]) for line in fallbacks] == list(damaged)
    for line, item in zip(fallbacks, damaged.values()):
        assert f"item '{item.split('/')[0]}'" in line, line
    assert "resumed from step 2" in resumed.stdout and resumed.stdout.count("num_steps 8 -> 10") == 1
    assert checkpoint.latest_step(str(workdir)) == 10

    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            shutil.rmtree(step_dir / "params")
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint .* delete"):
        avllm_jax.load_model(workdir)


def test_a_stalled_run_dumps_every_thread_and_exits(demo_files, tmp_path):
    # Every media file a named pipe that nothing writes: the first batch never comes, as with
    # a hung network file system. SIGUSR1 first writes the stacks and the run goes on.
    data = tmp_path / "data"
    shutil.copytree(demo_files / "data", data)
    for path in data.rglob("*"):
        if path.is_file() and path.suffix != ".jsonl":
            path.unlink()
            os.mkfifo(path)
    workdir = tmp_path / "run"
    command = train_command(
        demo_files,
        workdir,
        f"--config.data.sources=({{'path': '{data / 'train.jsonl'}', 'weight': 1.0}},)",
        "--step_timeout_s=6",
    )
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dump = workdir / "hang_process_0.txt"
    try:
        deadline = time.time() + 300
        while not catches_sigusr1(process.pid) and process.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert dump.exists(), "the watchdog never started"
        # The loader reaches the read that hangs a moment after the watchdog starts (later on a
        # busy machine): ask again until a dump shows it, as a person at the terminal would.
        while "in load_media" not in dump.read_text() and process.poll() is None and time.time() < deadline:
            process.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 124, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: no training step completed in 6 s (--step_timeout_s); every thread's stack is in {dump}; exiting"
    )
    # SIGUSR1's dump, then the watchdog's, each with the stack of the read that hangs.
    by_signal, by_watchdog = dump.read_text().split("no training step completed in 6 s")
    assert "in load_media" in by_signal and "in load_media" in by_watchdog


def test_ctrl_c_leaves_a_loadable_checkpoint(demo_files, tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        train_command(demo_files, workdir, "--config.num_steps=200", "--config.checkpoint_every=1"),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for_line(process, "step 3/", timeout_s=300)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    # The first Ctrl-C ends the step under way; the grain workers and the save in flight finish.
    assert process.returncode == 130 and "interrupting after this step (Ctrl-C again to stop at once)" in err, err[
        -3000:
    ]
    assert (
        f"interrupted; the newest checkpoint is step {checkpoint.latest_step(str(workdir))} in" in err
        and "Traceback" not in err
    )
    assert not [e for e in os.listdir(workdir / "checkpoints") if "tmp" in e]
    avllm_jax.load_model(workdir)
