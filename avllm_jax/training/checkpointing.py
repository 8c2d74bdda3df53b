"""The train state on disk: an orbax CheckpointManager over a training workdir's checkpoints/.

Each step holds the whole model's parameters (so `avllm_jax.load_model` reads a workdir like
a converted checkpoint), the optimizer state and the grain iterator state, so a restarted
job continues exactly where it stopped, and the number of processes that wrote it: each
process saves its own data iterator's position, so a run resumes on as many processes.
With several processes, each writes its shards of the arrays and its iterator state.
"""
from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from avllm_jax.checkpoint import CHECKPOINTS_DIR


def checkpoint_manager(workdir: str, *, save_every: int, keep: int) -> ocp.CheckpointManager:
    """Async orbax manager for a training workdir: saves in the background, keeps the last `keep`.

    Orbax writes each step to a temporary directory and renames it when complete, so a
    process killed mid-save leaves the previous step as the latest loadable one.
    """
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=True)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR)),
        options=options,
        item_names=("params", "opt_state", "data_iterator", "run"),
    )


def save_train_state(manager: ocp.CheckpointManager, step: int, params, opt_state, data_iterator, *, force: bool = False) -> bool:
    """params: the whole model's state (trainable and frozen), so the step loads on its own."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
            opt_state=ocp.args.StandardSave(opt_state),
            data_iterator=grain.checkpoint.CheckpointSave(data_iterator),
            run=ocp.args.JsonSave({"process_count": jax.process_count()}),
        ),
        force=force,
    )


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state, data_iterator):
    """Restores onto the shardings of the abstract trees; the data iterator in place.

    Raises ValueError when the step was written by another number of processes."""
    saved = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]["process_count"]
    if saved != jax.process_count():
        raise ValueError(
            f"checkpoint step {step} in {manager.directory} was written by {saved} process(es), but this run has "
            f"{jax.process_count()}: each process saved its own data iterator position, so resume with {saved}"
        )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(nnx.to_pure_dict(abstract_params)),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data_iterator=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
    )
    return restored["params"], restored["opt_state"]
