"""A damaged train-state checkpoint, whichever item is damaged and however: reported in one
line naming the step and the item, the newest intact step restored, the damaged one set aside."""

import logging
import os
import pathlib

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from avllm_jax import checkpoint
from avllm_jax.training import checkpointing

ITEMS = ("params", "opt_state", "data_iterator", "run")


def damage_by_deleting(item_dir: pathlib.Path):
    for path in item_dir.rglob("*"):
        if path.is_file():
            path.unlink()


def damage_by_truncating(item_dir: pathlib.Path):
    for path in item_dir.rglob("*"):
        if path.is_file() and path.stat().st_size:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def damage_by_removing_the_directory(item_dir: pathlib.Path):
    import shutil

    shutil.rmtree(item_dir)


DAMAGES = {
    "files deleted": damage_by_deleting,
    "files truncated": damage_by_truncating,
    "directory gone": damage_by_removing_the_directory,
}


class Tiny(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.arange(6, dtype=jnp.float32).reshape(2, 3))


def train_state(value: float):
    model = Tiny()
    model.w.set_value(model.w.get_value() + value)
    params = nnx.state(model)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(nnx.to_pure_dict(params))
    return params, opt_state


def data_iterator():
    return grain.MapDataset.range(100).to_iter_dataset().__iter__()


RUN = {
    "process_count": 1,
    "device_count": 1,
    "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    "global_batch_size": 8,
    "num_steps": 10,
    "optim": ml_collections.ConfigDict({"learning_rate": 1e-3}).to_dict(),
}


@pytest.fixture
def two_steps(tmp_path):
    """Steps 1 and 2 saved; at step 2 the iterator has yielded 5 elements, at step 1 two."""
    manager = checkpointing.checkpoint_manager(str(tmp_path), save_every=1, keep=3)
    iterator = data_iterator()
    for step, taken in ((1, 2), (2, 3)):
        for _ in range(taken):
            next(iterator)
        params, opt_state = train_state(float(step))
        checkpointing.save_train_state(manager, step, params, opt_state, iterator, RUN)
        manager.wait_until_finished()
    manager.close()
    return tmp_path


def restore(workdir, run=RUN):
    manager = checkpointing.checkpoint_manager(str(workdir), save_every=1, keep=3)
    params, opt_state = train_state(0.0)
    iterator = data_iterator()
    step, restored, _ = checkpointing.restore_train_state(
        manager, jax.eval_shape(lambda: params), jax.eval_shape(lambda: opt_state), iterator, run, new_schedule_ok=False
    )
    manager.close()
    return step, restored, next(iterator)


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("item", ITEMS)
def test_a_damaged_item_falls_back_to_the_step_before(two_steps, item, damage, caplog):
    assert restore(two_steps)[0] == 2  # intact: the newest step
    DAMAGES[damage](two_steps / checkpoint.CHECKPOINTS_DIR / "2" / item)
    step, params, next_element = restore(two_steps)
    assert step == 1
    np.testing.assert_array_equal(np.asarray(params["w"]), np.arange(6).reshape(2, 3) + 1.0)
    assert next_element == 2  # the iterator continues where step 1 left it
    reports = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(reports) == 1 and reports[0].startswith("checkpoint step 2 in ") and f"item {item!r}" in reports[0], (
        reports
    )
    assert (two_steps / checkpoint.CHECKPOINTS_DIR / "2.damaged").is_dir()
    assert not (two_steps / checkpoint.CHECKPOINTS_DIR / "2").exists()


def test_no_intact_step_says_what_to_delete(two_steps, caplog):
    for step in ("1", "2"):
        damage_by_deleting(two_steps / checkpoint.CHECKPOINTS_DIR / step / "opt_state")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"no intact checkpoint in .* \(steps \[2, 1\] all failed, see above\): delete"
    ):
        restore(two_steps)
    err = caplog.text
    assert "checkpoint step 2 in" in err and "checkpoint step 1 in" in err and err.count("item 'opt_state'") == 2


def test_an_unfinished_save_is_not_a_step(two_steps):
    """What a process killed mid-save leaves: orbax's temporary directory, which is ignored."""
    os.rename(
        two_steps / checkpoint.CHECKPOINTS_DIR / "2",
        two_steps / checkpoint.CHECKPOINTS_DIR / "2.orbax-checkpoint-tmp-7",
    )
    assert restore(two_steps)[0] == 1


def test_another_global_batch_is_refused_with_both_values(two_steps):
    """The data position and the schedule count global batches. An intact step of another run
    is not damage, so no older step is tried either."""
    with pytest.raises(
        checkpoint.CheckpointMismatch,
        match=r"^checkpoint step 2 in .* was trained with global_batch_size=8, but this run has "
        r"global_batch_size=16: .* resume with --config.global_batch_size=8$",
    ):
        restore(two_steps, RUN | {"global_batch_size": 16})
    assert (two_steps / checkpoint.CHECKPOINTS_DIR / "2").is_dir()


def test_another_layout_resumes_and_says_so(two_steps, caplog):
    """Another process and device count (here only recorded: the arrays restore onto this
    process's devices) is an elastic restore, stated with both layouts."""
    written = RUN | {"device_count": 4, "mesh": {"data": 1, "fsdp": 4, "tensor": 1}}
    caplog.set_level(logging.INFO, logger="avllm_jax")
    assert restore(two_steps, written)[0] == 2
    assert (
        "elastic restore of step 2: written on 1 process(es) x 1 device(s), mesh {'data': 1, 'fsdp': 1, 'tensor': 1}, "
        "resuming on 1 process(es) x 4 device(s), mesh {'data': 1, 'fsdp': 4, 'tensor': 1}"
    ) in caplog.text
