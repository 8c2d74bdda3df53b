"""Which weights train, and how: the trainable filter, LoRA adapters on the LLM, AdamW, the
learning-rate schedule."""

from __future__ import annotations

import math
import re

import jax
import optax
from flax import nnx

from avllm_jax.models import llama


def path_name(path) -> str:
    """nnx state path -> the dotted name the config's regexes match ('llm.layers.q_proj')."""
    return ".".join(map(str, path))


def trainable_filter(patterns: list[str] | tuple[str, ...]):
    """An nnx filter selecting the parameters whose dotted name full-matches one of `patterns`.

    Everything else (the encoders, the LLM in pretraining, its base weights under LoRA) is
    frozen: it is not an argument of the differentiated function and has no optimizer state.
    """
    regex = trainable_regex(patterns)
    return nnx.All(nnx.Param, lambda path, _: regex.fullmatch(path_name(path)) is not None)


def trainable_regex(patterns: list[str] | tuple[str, ...]) -> re.Pattern:
    """One regex that full-matches the dotted names any of `patterns` full-matches."""
    if not patterns:
        raise ValueError("config.trainable lists no patterns: nothing would train")
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def apply_lora(model_config, lora_config):
    """The model config with the run's `config.lora` on its LLM (rank 0: no adapters, and the
    LLM config's LoRA fields at their defaults). Training and the planner apply it after building
    the model config from `config.model`, so that a checkpoint without adapters starts a LoRA run
    (checkpoint.load_model adds them) and one with adapters starts a full-tuning run (folded)."""
    if model_config.llm is None:
        return model_config
    if not lora_config.rank:
        defaults = llama.LlamaConfig()
        return model_config.replace(llm={name: getattr(defaults, name) for name in llama.LORA_FIELDS})
    return model_config.replace(
        llm=dict(
            lora_rank=int(lora_config.rank),
            lora_alpha=float(lora_config.alpha),
            lora_targets=tuple(lora_config.targets),
        )
    )


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_fraction` of the steps, then cosine decay to `final_learning_rate`."""
    warmup_steps = max(1, math.ceil(optim_config.warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=optim_config.final_learning_rate,
    )


def make_optimizer(optim_config, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on weight matrices only).

    `params` is the trainable state; its logical axes tell matrices from norms and biases.
    """
    schedule = learning_rate_schedule(optim_config, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(optim_config.max_grad_norm),
        optax.adamw(
            schedule,
            b1=optim_config.beta1,
            b2=optim_config.beta2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=decay_mask(params),
        ),
    )


def decay_mask(params: nnx.State):
    """True for weight matrices; a stacked layer's leading 'layers' axis does not count."""

    def is_matrix(variable):
        axes = variable.get_metadata().get("logical_axes") or (None,) * variable.get_value().ndim
        return variable.replace(sum(a != "layers" for a in axes) >= 2)

    return jax.tree.map(is_matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
