"""Defaults shared by the files in configs/: every field a training run reads.

A config file starts from `base_config()` and sets what its experiment needs, so the file
plus this function is the whole record of a run. Any field can be overridden on the command
line, e.g. `--config.optim.learning_rate=1e-4 --config.mesh.tensor=2`. `check_config` (run
first by `train`) rejects a field that `base_config()` does not declare, however it came in.

The model (`config.model`): `parts` names the parts the model has (models/avllm.py's PARTS),
`audio_kind` which audio encoder the part 'audio' is ('htsat', CLAP's, or 'whisper'), and
`config.model.<part>` declares every field of that part's config dataclass (the audio block:
those of every kind's, and a field set that `audio_kind`'s lacks is an error), each None ("not
set") by default. A field that is set overrides, and the rule is the same with or without a
starting checkpoint:

- without `init_checkpoint`, each named part is its dataclass's defaults plus the fields set
  (the LLM's `vocab_size` comes from the tokenizer);
- with `init_checkpoint`, each named part is the checkpoint's plus the fields set, and the
  checkpoint must hold exactly the named parts, its audio encoder of `audio_kind`: a part named
  but absent, or present but not named, is an error, and so is another kind. So is a field that
  changes a weight's shape (sizes, `enable_fusion`): such a run overrides what keeps the weights
  (compute dtype, remat, attention, norm eps).

Fields set for a part that `parts` does not name are unused (training prints them): a config
file's settings for an encoder do not stop a run without it. A model without 'llm' is an error.

LoRA (`config.lora`, the paper's Table 9) is set apart from `config.model.llm`, whose LoRA
fields stay unset: it adds weights, which an override of a starting checkpoint may not, and it
is the run's choice, not the checkpoint's (`optim.apply_lora` puts it on the model config).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing

import ml_collections
from flax import nnx
from ml_collections import config_dict

from avllm_jax.data import phases as phases_lib
from avllm_jax.data.pipeline import RENAMED_DATA_FIELDS, default_data_config
from avllm_jax.errors import AvllmError
from avllm_jax.models import avllm, llama
from avllm_jax.training import optim, projector_init

LORA_ADAPTERS = r"llm\.layers\.lora\..*"  # the LLM's adapters, for config.trainable


class ConfigError(AvllmError, ValueError):
    """A config that names a field or model part that does not exist."""


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # A converted checkpoint (tools/convert_hf_weights.py) or an earlier stage's workdir; "":
    # random weights and the tokenizer below.
    config.init_checkpoint = ""
    # Without init_checkpoint: the tokenizer directory (with one, the checkpoint's is used).
    config.tokenizer = ""
    # The model's parts and per-part field overrides (see the module docstring).
    config.model = _model_config()
    # Regexes over dotted parameter names (e.g. 'llm.layers.q_proj'); the rest is frozen.
    config.trainable = (r"(temporal|spatial|audio)_proj\..*",)
    # How the projectors start in a run with no checkpoint to resume: "random" (the paper's: as
    # make_projectors, or init_checkpoint, has them) or "centred" (their rows centred and scaled to
    # the LLM's token embeddings over the first `projector_init_batches` batches; for stage 1 from a
    # frozen LLM: avllm_jax/training/projector_init.py).
    config.projector_init = "random"
    config.projector_init_batches = 8
    # LoRA on the LLM; rank 0 is off. With rank > 0, adapters (update alpha / rank · x A B) go on
    # the projections whose names ('layers.q_proj', ..., 'layers.down_proj') a regex of `targets`
    # full-matches, the LLM's base weights stay frozen, and config.trainable lists the adapters
    # (LORA_ADAPTERS) and no other LLM weight.
    config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=(r"layers\.(q|k|v|o|gate|up|down)_proj",)))
    config.data = default_data_config()

    config.global_batch_size = 128
    config.num_microbatches = 1  # gradient accumulation: the batch is split into this many passes
    config.train_epochs = 1.0  # how long the run is, in passes over the sources' samples
    config.num_steps = -1  # > 0 overrides train_epochs
    # Phased training (the paper's Table 4; avllm_jax/data/phases.py): a tuple of
    # dict(modalities=(...), share=s), each phase drawing only samples of the modalities it
    # names ('visual', 'audio', 'audio_visual', 'text' for text-only) for its share of the steps
    # (the shares sum to 1; data.source_epochs must be None). Empty: the paper's modality-augmented
    # training (MAT), one phase with every modality mixed in each batch.
    config.phases = ()
    config.init_seed = 0  # the random initialisation of the weights not loaded from init_checkpoint

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 2e-5  # the peak, reached after the warmup
    config.optim.warmup_fraction = 0.03  # of the steps, linear from 0
    config.optim.final_learning_rate = 0.0  # where the cosine decay ends, at the last step
    config.optim.beta1 = 0.9
    config.optim.beta2 = 0.98
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.0  # AdamW's, on weight matrices only
    config.optim.max_grad_norm = 1.0  # clip by global norm

    # Device mesh: sizes of ('data', 'fsdp', 'tensor'); -1 takes the rest of the devices.
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.log_every = 10  # steps between log lines (stdout and TensorBoard)
    config.checkpoint_every = 500  # steps between checkpoints; the last step always saves
    config.keep_checkpoints = 3
    # Peak FLOP/s of one device for MFU; None looks it up from the device kind.
    config.peak_flops_per_device = config_dict.placeholder(float)
    return config


def load_config_file(path: str, *arguments: str) -> ml_collections.ConfigDict:
    """`get_config(*arguments)` of a config file, as `--config=PATH:ARGUMENT` loads it; for a
    config written on top of another (configs/ablations/ on configs/sft.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*arguments)


STAGES = ("pretrain", "sft")


def ablation_stage(
    configs_dir: str, stage: str, name: str, *, converted: str | None = None
) -> ml_collections.ConfigDict:
    """`configs/<stage>.py` for the ablation `name`, which trains both stages in runs/<name>/:
    its pretraining starts from `converted` (the converted checkpoint of its own encoders and
    LLM; None: the default one), its SFT from its own pretraining."""
    if stage not in STAGES:
        raise ConfigError(f"the stage of an ablation config is one of {STAGES}, not {stage!r} (--config=FILE:sft)")
    config = load_config_file(os.path.join(configs_dir, f"{stage}.py"))
    if stage == "pretrain" and converted:
        config.init_checkpoint = converted
    if stage == "sft":
        config.init_checkpoint = f"runs/{name}/pretrain"
    return config


def accelerator_model_overrides() -> dict:
    """bfloat16 compute, remat and fused attention for the full-size model on GPU/TPU."""
    return dict(
        vision=dict(dtype="bfloat16", attention_implementation="auto"),
        audio=dict(dtype="bfloat16"),
        llm=dict(dtype="bfloat16", remat_policy="dots", attention_implementation="auto"),
    )


def _model_config() -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.parts = ("vision", "audio", "llm")  # the paper's model
    model.audio_kind = "htsat"  # the part 'audio' is CLAP's HTSAT, or "whisper" (the paper's Table 6)
    for part in avllm.PARTS:
        # The audio block takes the fields of either kind's dataclass (those both have are of one type).
        classes = dict.fromkeys(avllm.part_config_class(part, kind) for kind in avllm.AUDIO_ENCODERS)
        model[part] = ml_collections.ConfigDict(
            {
                field.name: config_dict.placeholder(_flag_type(typing.get_type_hints(cls)[field.name]))
                for cls in classes
                for field in dataclasses.fields(cls)
            }
        )
    return model


def _flag_type(hint) -> type:
    """The type a field's value is checked and parsed (on the command line) as."""
    if hint in (bool, int, float, str):
        return hint
    if typing.get_origin(hint) is tuple:
        return tuple
    return object  # e.g. `dict | None`: config_flags parses a Python literal


def model_overrides(config) -> dict[str, dict]:
    """{part: {field: value}}: the fields set in each part's block, named in parts or not."""
    return {part: {k: v for k, v in config.model[part].items() if v is not None} for part in avllm.PARTS}


def part_config(config, part: str, fields: dict):
    """`part`'s config dataclass of `fields`: for the audio part, config.model.audio_kind's."""
    return avllm.part_config_class(part, config.model.audio_kind)(**fields)


def check_config(config) -> None:
    """Raises ConfigError listing every field `base_config()` does not declare (with the
    nearest declared name), every declared block that is missing or was replaced by one
    lacking fields, and `config.model.parts` naming a part that does not exist, one twice, or
    no 'llm'; an audio_kind that does not exist, or audio fields set that its dataclass lacks;
    LoRA settings that cannot work; a projector_init that does not exist; and config.phases
    that are malformed (data/phases.py)."""
    problems = list(_compare(config, base_config(), "config"))
    if not problems:
        parts = config.model.parts
        problems += [_unknown_part(p) for p in parts if p not in avllm.PARTS]
        if len(set(parts)) != len(parts):
            problems.append(f"config.model.parts={parts!r} names a part twice")
        if "llm" not in parts:
            problems.append(f"config.model.parts={parts!r} lacks 'llm': every model has one")
        problems += _audio_problems(config)
        if config.projector_init not in projector_init.INITS:
            problems.append(f"config.projector_init={config.projector_init!r} is not one of {projector_init.INITS}")
        if config.projector_init_batches < 1:
            problems.append(f"config.projector_init_batches={config.projector_init_batches}: it must be at least 1")
        problems += _lora_problems(config)
        problems += phases_lib.config_problems(config)
    if problems:
        raise ConfigError("bad config:\n  " + "\n  ".join(problems))


def _unknown_part(name: str) -> str:
    if name in RENAMED_PARTS:
        return f"config.model.parts names {name!r}, which is now {RENAMED_PARTS[name]}"
    return f"config.model.parts names {name!r}, not a part ({_nearest(name, avllm.PARTS)})"


def _audio_problems(config) -> list[str]:
    """An audio_kind that is no audio encoder, or fields set in config.model.audio that its
    dataclass lacks (another kind's)."""
    kind = config.model.audio_kind
    if kind not in avllm.AUDIO_ENCODERS:
        return [f"config.model.audio_kind={kind!r} is not an audio encoder ({_nearest(kind, avllm.AUDIO_ENCODERS)})"]
    fields = {other: {f.name for f in dataclasses.fields(cls)} for other, (cls, _) in avllm.AUDIO_ENCODERS.items()}
    problems = []
    for name in sorted(set(model_overrides(config)["audio"]) - fields[kind]):
        owners = " or ".join(repr(other) for other, names in fields.items() if name in names)
        problems.append(
            f"config.model.audio.{name} is a field of the {owners} audio encoder, not of "
            f"config.model.audio_kind={kind!r}: set the kind, or leave the field unset"
        )
    return problems


def _lora_problems(config) -> list[str]:
    """LoRA fields set in config.model.llm, and with config.lora.rank > 0: a target matching no
    projection, a non-positive alpha, and a config.trainable that trains a base weight of the LLM
    or no adapter."""
    problems = [
        f"config.model.llm.{name} is set: LoRA is set through config.lora (rank, alpha, targets)"
        for name in llama.LORA_FIELDS
        if config.model.llm[name] is not None
    ]
    lora = config.lora
    if not lora.rank:
        return problems
    if lora.alpha <= 0:
        problems.append(f"config.lora.alpha={lora.alpha!r}: it must be positive (the update's scale is alpha / rank)")
    # The parameter names do not depend on the sizes: the tiny LLM with the run's adapters has them all.
    llm = dataclasses.replace(
        llama.PRESETS["tiny"], lora_rank=int(lora.rank), lora_alpha=1.0, lora_targets=tuple(lora.targets)
    )
    try:
        state = nnx.state(nnx.eval_shape(lambda: llama.Llama(llm, rngs=nnx.Rngs(0))))
    except ValueError as error:
        return problems + [f"config.lora: {error}"]
    if not config.trainable:
        return problems  # training's trainable filter says so
    trained = optim.trainable_regex(config.trainable)
    names = {
        "llm." + optim.path_name(path): isinstance(variable, nnx.LoRAParam)
        for path, variable in nnx.to_flat_state(state)
    }
    base = sorted(name for name, is_adapter in names.items() if not is_adapter and trained.fullmatch(name))
    if base:
        problems.append(
            f"config.lora.rank={lora.rank} freezes the LLM's base weights, but config.trainable trains "
            f"{base[0]} ({len(base)} in all): list the adapters, r'{LORA_ADAPTERS}', and no other LLM weight"
        )
    if not any(is_adapter and trained.fullmatch(name) for name, is_adapter in names.items()):
        problems.append(f"config.lora.rank={lora.rank} but config.trainable trains no adapter: add r'{LORA_ADAPTERS}'")
    return problems


def _compare(config, reference, prefix):
    for key in config.keys():
        name = f"{prefix}.{key}"
        if key not in reference:
            yield _renamed(name.removeprefix("config.")) or f"{name} is not a field ({_nearest(key, reference.keys())})"
        elif isinstance(reference[key], ml_collections.ConfigDict):
            if isinstance(config[key], ml_collections.ConfigDict):
                yield from _compare(config[key], reference[key], name)
            else:
                fields = ", ".join(sorted(reference[key].keys()))
                yield f"{name} must be a block of fields ({fields}), not {config[key]!r}"
    missing = sorted(set(reference.keys()) - set(config.keys()))
    if missing:
        # A block replaced wholesale loses base_config()'s fields: set them on it instead.
        yield f"{prefix} lacks {', '.join(missing)}: update base_config()'s fields rather than replacing {prefix}"


# Fields renamed because two meant different things under one name: old name -> new name. The
# Whisper encoder's block went when the audio encoder became one part of either kind.
RENAMED_FIELDS = {
    "num_epochs": "train_epochs",
    "seed": "init_seed",
    **{f"data.{old}": f"data.{new}" for old, new in RENAMED_DATA_FIELDS.items()},
    "model.whisper": "model.audio, with config.model.audio_kind='whisper'",
}
# Parts renamed, for config.model.parts: old name -> what to name now.
RENAMED_PARTS = {"whisper": "'audio' with config.model.audio_kind='whisper'"}


def _renamed(name: str) -> str | None:
    """What to say of a dotted field name ('data.seed') that was renamed, or is in a renamed
    block ('model.whisper.d_model'), or None."""
    keys = name.split(".")
    for old in (".".join(keys[:end]) for end in range(len(keys), 0, -1)):
        if old in RENAMED_FIELDS:
            return f"config.{old} was renamed config.{RENAMED_FIELDS[old]}"
    return None


def unknown_field(path: str) -> str | None:
    """For a dotted override path ('optim.lr'), what in it base_config() does not declare, or None."""
    if renamed := _renamed(path):
        return renamed
    node, walked = base_config(), "config"
    for key in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"{walked} is a value, not a block of fields"
        if key not in node:
            return f"{walked}.{key} is not a field ({_nearest(key, node.keys())})"
        node, walked = node[key], f"{walked}.{key}"
    return None


def _nearest(name: str, choices) -> str:
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {near[0]!r}?" if near else f"choose from {', '.join(sorted(choices))}"
