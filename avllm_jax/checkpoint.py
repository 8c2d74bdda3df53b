"""What a model directory holds on disk, and reading it back: `load_model(path)`.

Two kinds of directory load the same way:

- a converted checkpoint (tools/convert_hf_weights.py): `config.json`, the tokenizer files and
  `params/` (an orbax checkpoint of the parameter tree);
- a training workdir: `config.json`, `data_config.json`, the tokenizer files and
  `checkpoints/<step>/` written by training (avllm_jax/training/checkpointing.py), one item
  per part of the train state (`params`, `opt_state`, `data_iterator`). `load_model` takes
  the latest step's `params`.

A LoRA run's parameters hold its adapters beside the frozen base weights; `load_model` folds
them into the dense weights unless asked to keep them apart.

Inference, chat and evaluation import this module, not training.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from avllm_jax.data.pipeline import RENAMED_DATA_FIELDS, default_data_config
from avllm_jax.errors import AvllmError, UsageError, describe_error
from avllm_jax.models import layers, llama
from avllm_jax.models.avllm import AVLLM, LEGACY_WHISPER_PART, AVLLMConfig

logger = logging.getLogger(__name__)

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
    return AVLLMConfig.from_dict(_stored_model_config(directory))


def _stored_model_config(directory: str) -> dict:
    """The model config in `directory`'s config.json, as written."""
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
    return data["avllm"]


def stores_legacy_whisper(directory: str) -> bool:
    """Whether `directory` was written when the Whisper encoder was the part 'whisper'
    (LEGACY_WHISPER_PART): its config.json names that part, and its parameters are stored under it."""
    if not os.path.exists(os.path.join(directory, CONFIG_FILE)):
        return False
    return _stored_model_config(directory).get(LEGACY_WHISPER_PART) is not None


def checked_model_config(path: str, flag: str = "--checkpoint") -> AVLLMConfig:
    """The model config at `path`, read without its weights, for a command to check its
    --checkpoint before anything loads: a UsageError naming `flag` when `path` holds no model."""
    try:
        return read_model_config(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag} {path}: {error}") from None


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
    # A workdir trained before the data fields were renamed.
    for old, new in RENAMED_DATA_FIELDS.items():
        if old in saved:
            saved[new] = saved.pop(old)
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


class CheckpointError(AvllmError, RuntimeError):
    """A checkpoint that cannot be read; the message names the step or directory and why."""


def newest_intact_step(manager: ocp.CheckpointManager, restore, *, report=None):
    """(step, restore(step)) for the newest step that `restore` reads without an error.

    Each step that fails is reported in one line (to stderr unless `report` is given), naming
    the step and the cause; with none intact the CheckpointError says what to delete.
    """
    report = report or logger.warning
    steps = sorted(manager.all_steps(), reverse=True)
    _silence_failed_reads()  # before a read can fail: its noise may come at once
    for step in steps:
        try:
            return step, restore(step)
        except CheckpointMismatch:
            raise
        except Exception as error:  # a damaged step: fall back to the one before
            reason = str(error) if isinstance(error, CheckpointError) else describe_error(error)  # ours already say it
            report(f"checkpoint step {step} in {manager.directory} cannot be restored: {reason}")
            _settle_failed_reads()
    raise CheckpointError(
        f"no intact checkpoint in {manager.directory} (steps {steps} all failed, see above): delete the "
        f"damaged steps, or the whole directory to start over"
    )


class _FailedReadNoise(logging.Filter):
    """What the reads of a failed restore still in flight report once it has given up: asyncio's
    "Task exception was never retrieved" for each array that failed too, and, from TensorStore's
    threads, "Event loop is closed" for each read that ends after orbax closed its event loop.
    The failure itself was reported in one line."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._previous_hook = sys.unraisablehook

    def filter(self, record: logging.LogRecord) -> bool:
        noise = str(record.msg).split("\n", 1)[0].endswith("exception was never retrieved")
        self.count += noise
        return not noise

    def unraisable(self, unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            self.count += 1
        else:
            self._previous_hook(unraisable)


_failed_read_noise: _FailedReadNoise | None = None


def _silence_failed_reads() -> None:
    """From now on, _FailedReadNoise is not printed (the reads of a failed restore may end at any time)."""
    global _failed_read_noise
    if _failed_read_noise is None:
        _failed_read_noise = _FailedReadNoise()
        logging.getLogger("asyncio").addFilter(_failed_read_noise)
        sys.unraisablehook = _failed_read_noise.unraisable


def _settle_failed_reads(settle_s: float = 0.5, at_most_s: float = 10.0) -> None:
    """Waits until the reads of a failed restore have ended (no new noise for `settle_s`), so
    that the run goes on without them."""
    noise = _failed_read_noise
    if noise is None:
        return
    deadline = time.monotonic() + at_most_s
    while time.monotonic() < deadline:
        before = noise.count
        gc.collect()  # the failed tasks report when collected
        time.sleep(settle_s)
        if noise.count == before:
            return


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint that this run cannot continue (another process count, another
    schedule): falling back to an older step would not help."""


def latest_step(workdir: str) -> int | None:
    checkpoints = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(checkpoints):
        return None
    with ocp.CheckpointManager(os.path.abspath(checkpoints)) as manager:
        return manager.latest_step()


def load_model(
    path: str | os.PathLike,
    *,
    config_overrides: dict | None = None,
    shardings=None,
    keep_adapters: bool = False,
    adapter_seed: int = 0,
) -> AVLLM:
    """The model stored at `path` (converted checkpoint or training workdir), with its weights.

    config_overrides: e.g. {'llm': {'dtype': 'bfloat16'}}; shardings: an optional pytree of
    `jax.sharding.Sharding` matching the returned model's parameter state, to restore straight
    onto a mesh (default: this process's first device).

    LoRA: the adapters a LoRA run stored are folded into the dense weights (W + alpha / rank ·
    A @ B), and the model has none, as inference and export want; `keep_adapters` returns them
    apart, as trained. Overrides that set `llm.lora_rank` > 0, as a LoRA run starting from this
    checkpoint does, ask for new adapters (B = 0, A drawn from `adapter_seed`) on the folded
    weights; with `keep_adapters` the stored ones are kept instead and must be of that shape.
    """
    path = os.fspath(path)
    stored = read_model_config(path)
    config = stored.replace(**config_overrides) if config_overrides else stored
    restore_config, fold, add = config, False, False
    if config.llm is not None:
        assert stored.llm is not None  # replace() sets fields of the parts the stored config has only
        stored_lora = {name: getattr(stored.llm, name) for name in llama.LORA_FIELDS}
        asked_lora = {name: getattr(config.llm, name) for name in llama.LORA_FIELDS}
        if keep_adapters and asked_lora != stored_lora:
            raise ValueError(
                f"{path} holds the adapters {stored_lora}, not {asked_lora}: keep_adapters keeps only "
                "those stored (without it they are folded, and new ones made for the overrides)"
            )
        restore_config = config.replace(llm=stored_lora)
        fold = bool(stored.llm.lora_rank) and not keep_adapters
        add = bool((config_overrides or {}).get("llm", {}).get("lora_rank")) and not keep_adapters
        if not add and not keep_adapters:
            defaults = llama.LlamaConfig()
            config = config.replace(llm={name: getattr(defaults, name) for name in llama.LORA_FIELDS})
    graphdef, abstract_state = abstract_model(config)
    if shardings is None:
        # Onto this process's first device, whatever topology wrote the checkpoint (a pod's
        # training run loads on a laptop).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_state)
    shardings = traverse_util.flatten_dict(nnx.to_pure_dict(shardings))
    params = _restore_params(path, restore_config, shardings)
    if fold:
        assert restore_config.llm is not None  # fold is set for a model with an LLM only
        params = fold_adapters(params, restore_config.llm)
    if add:
        params["llm"]["layers"] |= new_adapters(config, adapter_seed, shardings)
    nnx.replace_by_pure_dict(abstract_state, params)
    return nnx.merge(graphdef, abstract_state)


def _restore_params(path: str, config: AVLLMConfig, shardings: dict) -> dict:
    """The pure-dict parameters of a model of `config` stored at `path`, placed by the flat
    `shardings`; those it lacks (adapters about to be folded away) go whole onto the devices
    of the first. A Whisper encoder stored under its old part name is read as the part 'audio'."""
    target = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_model(config)[1]))
    first = next(iter(shardings.values()))
    whole = (
        jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
        if isinstance(first, jax.sharding.NamedSharding)
        else first
    )
    target = traverse_util.unflatten_dict(
        {key: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings.get(key, whole)) for key, a in target.items()}
    )
    if not stores_legacy_whisper(path):
        return _read_params(path, target)
    renamed = lambda tree, old, new: {new if key == old else key: value for key, value in tree.items()}
    return renamed(_read_params(path, renamed(target, "audio", LEGACY_WHISPER_PART)), LEGACY_WHISPER_PART, "audio")


def _read_params(path: str, target: dict) -> dict:
    """The parameter tree stored at `path` (its params/, or its latest intact training step), as `target` shapes it."""
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
        try:
            return ocp.StandardCheckpointer().restore(params_dir, target)
        except Exception as error:  # orbax raises many kinds; the message names the file
            raise CheckpointError(f"{params_dir} cannot be restored: {describe_error(error)}") from None
    if latest_step(path) is None:
        raise FileNotFoundError(f"{path} has neither {PARAMS_DIR}/ nor a training checkpoint under {CHECKPOINTS_DIR}/")
    with ocp.CheckpointManager(os.path.abspath(os.path.join(path, CHECKPOINTS_DIR))) as manager:
        step, restored = newest_intact_step(
            manager,
            lambda step: manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))[
                "params"
            ],
        )
        if step != manager.latest_step():
            logger.warning(f"loaded step {step} of {path}, the newest intact one")
    return restored


def fold_adapters(params: dict, llm_config: llama.LlamaConfig) -> dict:
    """The pure-dict parameters of a whole model with the LLM's adapters folded into the kernels
    they adapt (layers.merge_lora) and removed."""
    scale = llm_config.lora_alpha / llm_config.lora_rank
    layer = dict(params["llm"]["layers"])
    for name, adapter in layer.pop("lora").items():
        # On the kernel's own placement: each device computes only its shard of the update.
        fold = jax.jit(
            lambda kernel, a, b: layers.merge_lora(kernel, a, b, scale), out_shardings=_kernel(layer, name).sharding
        )
        folded = fold(_kernel(layer, name), adapter["a"], adapter["b"])
        layer[name] = dict(layer[name], kernel=folded) if isinstance(layer[name], dict) else folded
    return params | {"llm": params["llm"] | {"layers": layer}}


def _kernel(layer: dict, name: str):
    # Attention projections are kernels themselves; the MLP's are Dense layers holding one.
    return layer[name]["kernel"] if isinstance(layer[name], dict) else layer[name]


def new_adapters(config: AVLLMConfig, seed: int, shardings: dict) -> dict:
    """The LLM's adapters (the `lora` dict of its stacked layers) as a new model of `config` has
    them, placed by the flat `shardings`. Only they are computed: XLA drops the rest of the
    initialisation, whose results are not returned."""

    def init():
        return nnx.to_pure_dict(nnx.state(AVLLM(config, rngs=nnx.Rngs(seed)), nnx.LoRAParam))["llm"]["layers"]

    structure = traverse_util.flatten_dict(jax.eval_shape(init))
    placement = traverse_util.unflatten_dict({key: shardings[("llm", "layers", *key)] for key in structure})
    return jax.jit(init, out_shardings=placement)()
