"""The train state on disk: an orbax CheckpointManager over a training workdir's checkpoints/.

Each step holds the whole model's parameters (so `avllm_jax.load_model` reads a workdir like
a converted checkpoint), the optimizer state and the grain iterator state, so a restarted
job continues exactly where it stopped.
"""
from __future__ import annotations

import os

import grain
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
        item_names=("params", "opt_state", "data_iterator"),
    )


def save_train_state(manager: ocp.CheckpointManager, step: int, params, opt_state, data_iterator, *, force: bool = False) -> bool:
    """params: the whole model's state (trainable and frozen), so the step loads on its own."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
            opt_state=ocp.args.StandardSave(opt_state),
            data_iterator=grain.checkpoint.CheckpointSave(data_iterator),
        ),
        force=force,
    )


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state, data_iterator):
    """Restores onto the shardings of the abstract trees; the data iterator in place."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(nnx.to_pure_dict(abstract_params)),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data_iterator=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
    )
    return restored["params"], restored["opt_state"]
