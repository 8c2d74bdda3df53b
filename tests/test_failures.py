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
            "--config.data.min_samples_before_bad_check=20",
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


def test_damaged_latest_checkpoint_falls_back_and_schedule_changes_need_a_flag(demo_files, tmp_path, caplog):
    workdir = tmp_path / "run"
    first = run(train_command(demo_files, workdir, "--config.num_steps=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert checkpoint.latest_step(str(workdir)) == 4
    rerun = run(train_command(demo_files, workdir, "--config.num_steps=4"))
    assert rerun.returncode == 0 and "is finished: it saved step 4 of 4" in rerun.stdout

    extended = train_command(demo_files, workdir, "--config.num_steps=6")
    assert_short_error(run(extended), "belongs to another schedule", "num_steps 4 -> 6", "--allow_new_schedule")

    shutil.rmtree(workdir / "checkpoints" / "4" / "params")
    avllm_jax.load_model(workdir)  # chat and evaluation load the newest intact step
    err = caplog.text
    assert "checkpoint step 4" in err and "loaded step 2" in err

    resumed = run(extended + ["--allow_new_schedule"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step 4" in resumed.stderr and "item 'params'" in resumed.stderr
    assert len([line for line in resumed.stderr.splitlines() if "checkpoint step 4" in line]) == 1
    assert "resumed from step 2" in resumed.stdout and "num_steps 4 -> 6" in resumed.stdout
    assert checkpoint.latest_step(str(workdir)) == 6

    for step in (4, 6):  # keep_checkpoints=2: steps 4 and 6 are left
        shutil.rmtree(workdir / "checkpoints" / str(step) / "params", ignore_errors=True)
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint .* delete"):
        avllm_jax.load_model(workdir)


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
