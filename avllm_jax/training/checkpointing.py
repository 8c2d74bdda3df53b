"""The train state on disk: an orbax CheckpointManager over a training workdir's checkpoints/.

Each step holds the whole model's parameters (so `avllm_jax.load_model` reads a workdir like
a converted checkpoint), the optimizer state and the grain iterator state, so a restarted
job continues exactly where it stopped, and a record of the run (`run_record`): its layout
(processes, devices, mesh), global batch and learning-rate schedule. With several processes,
each writes its shards of the arrays and its iterator state.

A step resumes on another layout (elastic restore): orbax reads the arrays onto the new mesh's
shardings, and the data iterators continue from every old process's position
(data/position.py). Only the global batch must stay: the data position and the schedule
count global batches. A damaged step is reported and the one before it restored.
"""

from __future__ import annotations

import json
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


def run_record(num_steps: int, optim_config, global_batch_size: int, mesh) -> dict:
    """What a checkpoint records of its run: its layout (said when a resume changes it), the
    global batch (which must stay) and the learning-rate schedule (a resume under another one
    would silently change the rates)."""
    return {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "mesh": dict(mesh.shape),
        "global_batch_size": global_batch_size,
        "num_steps": num_steps,
        "optim": optim_config.to_dict(),
    }


def describe_layout(run: dict) -> str:
    if "device_count" not in run:  # a step written before the layout was recorded
        return f"{run['process_count']} process(es)"
    devices = run["device_count"] // run["process_count"]
    return f"{run['process_count']} process(es) x {devices} device(s), mesh {run['mesh']}"


def restore_train_state(
    manager, abstract_params, abstract_opt_state, data_iterator, run: dict, *, new_schedule_ok: bool
):
    """(step, params, opt_state) of the newest intact step, onto the shardings of the abstract
    trees, whatever layout wrote them; the data iterator is restored in place. A damaged step is
    reported (naming its item) and the one before it tried. An intact step of another global
    batch, or of another schedule unless `new_schedule_ok`, is a CheckpointMismatch. The layout
    of a step written on another one is printed."""

    def restore(step):
        saved = _restore_item(manager, step, "run", ocp.args.JsonRestore())
        schedule_changes = _check_same_run(manager, step, saved, run, new_schedule_ok)
        params = _restore_item(manager, step, "params", ocp.args.StandardRestore(nnx.to_pure_dict(abstract_params)))
        opt_state = _restore_item(manager, step, "opt_state", ocp.args.StandardRestore(abstract_opt_state))
        data_line = _restore_data_position(manager, step, saved["process_count"], data_iterator)
        return saved, params, opt_state, data_line, schedule_changes

    step, (saved, params, opt_state, data_line, schedule_changes) = checkpoint.newest_intact_step(manager, restore)
    _set_aside_steps_after(manager, step)
    if schedule_changes:
        logger.info(f"resuming under a new schedule: {'; '.join(schedule_changes)}")
    old, new = describe_layout(saved), describe_layout(run)
    if old != new:
        logger.info(f"elastic restore of step {step}: written on {old}, resuming on {new}")
        if data_line:
            logger.info(data_line)
    return step, params, opt_state


def _restore_data_position(manager, step, process_count, data_iterator) -> str | None:
    """Restores the data iterator from every writing process's state (grain's files
    process_<i>-of-<n>.json); a line when it continues on another layout."""
    directory = os.path.join(str(manager.directory), str(step), "data_iterator")
    states = []
    try:
        for index in range(process_count):
            with open(os.path.join(directory, f"process_{index}-of-{process_count}.json")) as f:
                states.append(json.load(f))
        if hasattr(data_iterator, "restore_states"):
            return data_iterator.restore_states(states)
        if process_count != jax.process_count():
            raise checkpoint.CheckpointMismatch(
                f"checkpoint step {step} in {manager.directory} was written by {process_count} process(es), but "
                f"this run has {jax.process_count()} and its data iterator resumes only on as many"
            )
        data_iterator.set_state(states[jax.process_index()])
    except checkpoint.CheckpointMismatch:
        raise
    except Exception as error:  # a missing or damaged file, a state of another pipeline
        raise checkpoint.CheckpointError(f"item 'data_iterator': {checkpoint.describe_error(error)}") from error
    return None


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


def _check_same_run(manager, step, saved, run, new_schedule_ok) -> list[str]:
    """The schedule's changes (allowed by `new_schedule_ok`); another global batch, or schedule
    without it, is a CheckpointMismatch."""
    where = f"checkpoint step {step} in {manager.directory}"
    saved_batch = saved.get("global_batch_size", run["global_batch_size"])
    if saved_batch != run["global_batch_size"]:
        raise checkpoint.CheckpointMismatch(
            f"{where} was trained with global_batch_size={saved_batch}, but this run has "
            f"global_batch_size={run['global_batch_size']}: the data position and the schedule count global "
            f"batches, so resume with --config.global_batch_size={saved_batch}"
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
        return changed
    return []
