"""What a model directory holds on disk, and reading it back: `load_model(path)`.

Two kinds of directory load the same way:

- a converted checkpoint (tools/convert_hf_weights.py): `config.json`, the tokenizer files and
  `params/` (an orbax checkpoint of the parameter tree);
- a training workdir: `config.json`, `data_config.json`, the tokenizer files and
  `checkpoints/<step>/` written by training (avllm_jax/training/checkpointing.py), one item
  per part of the train state (`params`, `opt_state`, `data_iterator`). `load_model` takes
  the latest step's `params`.

Inference, chat and evaluation import this module, not training.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from avllm_jax.data.pipeline import default_data_config
from avllm_jax.models.avllm import AVLLM, AVLLMConfig

CONFIG_FILE = "config.json"
DATA_CONFIG_FILE = "data_config.json"  # the media settings the model was trained with
TRAIN_CONFIG_FILE = "train_config.json"  # a training workdir's whole run config
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"


def write_model_config(directory: str, config: AVLLMConfig) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"avllm": config.to_dict()}, f, indent=2)


def read_model_config(directory: str) -> AVLLMConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_FILE}: it is neither a converted checkpoint "
            "(tools/convert_hf_weights.py --out) nor a training workdir"
        )
    with open(path) as f:
        data = json.load(f)
    if "avllm" not in data:
        raise ValueError(f"{path} is not an avllm_jax model config (no 'avllm' key); is it a Hugging Face config?")
    return AVLLMConfig.from_dict(data["avllm"])


def write_data_config(directory: str, data_config) -> None:
    with open(os.path.join(directory, DATA_CONFIG_FILE), "w") as f:
        f.write(data_config.to_json(indent=2))


def read_data_config(directory: str):
    """The data settings saved by training (None for a converted checkpoint), over the defaults."""
    path = os.path.join(os.fspath(directory), DATA_CONFIG_FILE)
    if not os.path.exists(path):
        return None
    config = default_data_config()
    with open(path) as f:
        saved = json.load(f)
    saved["sources"] = tuple(saved.get("sources", ()))
    config.update(saved)
    return config


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """{'a.b.c': x} -> {'a': {'b': {'c': x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def save_params(directory: str, params: dict) -> None:
    """Writes a parameter tree (nested dict of arrays) as an orbax checkpoint at `directory`."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), params, force=True)
    checkpointer.wait_until_finished()


def abstract_model(config: AVLLMConfig):
    """(graphdef, abstract state) of the model, without allocating it."""
    return nnx.split(nnx.eval_shape(lambda: AVLLM(config, rngs=nnx.Rngs(0))))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the step or directory and why."""


def describe_error(error: BaseException) -> str:
    """The root cause of a (chained) exception in one line: orbax and tensorstore bury the
    file that is missing or damaged under several wrappers."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:400]}"


def newest_intact_step(manager: ocp.CheckpointManager, restore, *, report=None):
    """(step, restore(step)) for the newest step that `restore` reads without an error.

    Each step that fails is reported in one line (to stderr unless `report` is given), naming
    the step and the cause; with none intact the CheckpointError says what to delete.
    """
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            return step, restore(step)
        except CheckpointMismatch:
            raise
        except Exception as error:  # a damaged step: fall back to the one before
            reason = str(error) if isinstance(error, CheckpointError) else describe_error(error)  # ours already say it
            report(f"checkpoint step {step} in {manager.directory} cannot be restored: {reason}")
    raise CheckpointError(
        f"no intact checkpoint in {manager.directory} (steps {steps} all failed, see above): delete the "
        f"damaged steps, or the whole directory to start over"
    )


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint that this run cannot continue (another process count, another
    schedule): falling back to an older step would not help."""


def latest_step(workdir: str) -> int | None:
    checkpoints = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(checkpoints):
        return None
    with ocp.CheckpointManager(os.path.abspath(checkpoints)) as manager:
        return manager.latest_step()


def load_model(path: str | os.PathLike, *, config_overrides: dict | None = None, shardings=None) -> AVLLM:
    """The model stored at `path` (converted checkpoint or training workdir), with its weights.

    config_overrides: e.g. {'llm': {'dtype': 'bfloat16'}}; shardings: an optional pytree of
    `jax.sharding.Sharding` matching the parameter state, to restore straight onto a mesh
    (default: this process's first device).
    """
    path = os.fspath(path)
    config = read_model_config(path)
    if config_overrides:
        config = config.replace(**config_overrides)
    graphdef, abstract_state = abstract_model(config)
    target = nnx.to_pure_dict(abstract_state)
    if shardings is None:
        # Onto this process's first device, whatever topology wrote the checkpoint (a pod's
        # training run loads on a laptop).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, target)
    else:
        shardings = nnx.to_pure_dict(shardings)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
        try:
            restored = ocp.StandardCheckpointer().restore(params_dir, target)
        except Exception as error:  # orbax raises many kinds; the message names the file
            raise CheckpointError(f"{params_dir} cannot be restored: {describe_error(error)}") from None
    else:
        if latest_step(path) is None:
            raise FileNotFoundError(f"{path} has neither {PARAMS_DIR}/ nor a training checkpoint under {CHECKPOINTS_DIR}/")
        with ocp.CheckpointManager(os.path.abspath(os.path.join(path, CHECKPOINTS_DIR))) as manager:
            step, restored = newest_intact_step(
                manager, lambda step: manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
            )
            if step != manager.latest_step():
                print(f"loaded step {step} of {path}, the newest intact one", file=sys.stderr, flush=True)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)
