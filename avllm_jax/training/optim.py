"""Which weights train, and how: the trainable filter, AdamW, the learning-rate schedule."""
from __future__ import annotations

import math
import re

import jax
import optax
from flax import nnx


def path_name(path) -> str:
    """nnx state path -> the dotted name the config's regexes match ('llm.layers.q_proj')."""
    return ".".join(map(str, path))


def trainable_filter(patterns: list[str] | tuple[str, ...]):
    """An nnx filter selecting the parameters whose dotted name full-matches one of `patterns`.

    Everything else (the encoders, and the LLM in pretraining) is frozen: it is not an
    argument of the differentiated function and has no optimizer state.
    """
    if not patterns:
        raise ValueError("config.trainable lists no patterns: nothing would train")
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    return nnx.All(nnx.Param, lambda path, _: regex.fullmatch(path_name(path)) is not None)


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
