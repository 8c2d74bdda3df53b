"""The train state on disk: an orbax CheckpointManager over a training workdir's checkpoints/.

Each step holds the whole model's parameters (so `avllm_jax.load_model` reads a workdir like
a converted checkpoint), the optimizer state and the grain iterator state, so a restarted
job continues exactly where it stopped, and a record of the run (`run_record`): the number
of processes that wrote it (each saves its own data iterator's position, so a run resumes on
as many processes) and the learning-rate schedule. With several processes, each writes its
shards of the arrays and its iterator state. A damaged step is reported and the one before
it restored.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from avllm_jax import checkpoint, errors
from avllm_jax.checkpoint import CHECKPOINTS_DIR

logger = logging.getLogger(__name__)


def checkpoint_manager(workdir: str, *, save_every: int, keep: int) -> ocp.CheckpointManager:
    """Async orbax manager for a training workdir: saves in the background, keeps the last `keep`.

    Orbax writes each step to a temporary directory and renames it when complete, so a
    process killed mid-save leaves the previous step as the latest loadable one.
    """
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=True
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR)),
        options=options,
        item_names=("params", "opt_state", "data_iterator", "run"),
    )


def save_train_state(
    manager: ocp.CheckpointManager, step: int, params, opt_state, data_iterator, run: dict, *, force: bool = False
) -> bool:
    """params: the whole model's state (trainable and frozen), so the step loads on its own.
    run: what a resume must match (`run_record`)."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
            opt_state=ocp.args.StandardSave(opt_state),
            data_iterator=grain.checkpoint.CheckpointSave(data_iterator),
            run=ocp.args.JsonSave(run),
        ),
        force=force,
    )


def run_record(num_steps: int, optim_config) -> dict:
    """What a checkpoint records of its run: the process count (each process saved its own
    data position) and the learning-rate schedule (a resume under another one would silently
    change the rates)."""
    return {"process_count": jax.process_count(), "num_steps": num_steps, "optim": optim_config.to_dict()}


def restore_train_state(
    manager, abstract_params, abstract_opt_state, data_iterator, run: dict, *, new_schedule_ok: bool
):
    """(step, params, opt_state) of the newest intact step, onto the shardings of the abstract
    trees; the data iterator is restored in place. A damaged step is reported (naming its item)
    and the one before it tried. An intact step of another process count, or of another
    schedule unless `new_schedule_ok`, is a CheckpointMismatch."""

    def restore(step):
        saved = _restore_item(manager, step, "run", ocp.args.JsonRestore())
        _check_same_run(manager, step, saved, run, new_schedule_ok)
        params = _restore_item(manager, step, "params", ocp.args.StandardRestore(nnx.to_pure_dict(abstract_params)))
        opt_state = _restore_item(manager, step, "opt_state", ocp.args.StandardRestore(abstract_opt_state))
        _restore_item(manager, step, "data_iterator", grain.checkpoint.CheckpointRestore(data_iterator))
        return params, opt_state

    step, (params, opt_state) = checkpoint.newest_intact_step(manager, restore)
    _set_aside_steps_after(manager, step)
    return step, params, opt_state


def _set_aside_steps_after(manager, step) -> None:
    """Renames the damaged steps after `step` to `<step>.damaged`: the run saves those steps
    again, and nothing is deleted that a user may want to look at."""
    damaged = [s for s in manager.all_steps() if s > step]
    if not damaged:
        return
    if jax.process_index() == 0:
        for s in damaged:
            source = os.path.join(str(manager.directory), str(s))
            os.rename(source, f"{source}.damaged")
            logger.warning(f"moved the damaged step {s} aside to {source}.damaged")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("damaged checkpoint steps set aside")
    manager.reload()


def _restore_item(manager, step, item, args):
    try:
        return manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as error:  # orbax and grain raise many kinds; name the item that failed
        raise checkpoint.CheckpointError(f"item {item!r}: {errors.describe_error(error)}") from error


def _check_same_run(manager, step, saved, run, new_schedule_ok):
    where = f"checkpoint step {step} in {manager.directory}"
    if saved["process_count"] != run["process_count"]:
        raise checkpoint.CheckpointMismatch(
            f"{where} was written by {saved['process_count']} process(es), but this run has {run['process_count']}: "
            f"each process saved its own data iterator position, so resume with {saved['process_count']}"
        )
    schedule = {k: saved.get(k) for k in ("num_steps", "optim")}
    if schedule != {k: run[k] for k in ("num_steps", "optim")}:
        changed = (
            [f"num_steps {schedule['num_steps']} -> {run['num_steps']}"]
            if schedule["num_steps"] != run["num_steps"]
            else []
        )
        changed += [
            f"optim.{k} {v!r} -> {run['optim'].get(k)!r}"
            for k, v in (schedule["optim"] or {}).items()
            if run["optim"].get(k) != v
        ]
        if not new_schedule_ok:
            raise checkpoint.CheckpointMismatch(
                f"{where} belongs to another schedule ({'; '.join(changed)}); rerun with the checkpoint's settings, "
                "or pass --allow_new_schedule to continue from it under the new one"
            )
        logger.info(f"resuming under a new schedule: {'; '.join(changed)}")
