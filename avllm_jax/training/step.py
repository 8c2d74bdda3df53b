"""The jitted training step: loss on answer tokens, gradient accumulation, AdamW update.

Only the trainable partition is an argument of the differentiated function, so no gradient
(and no backward pass) is ever built for the frozen encoders, and they hold no optimizer
state. The loss is the mean cross-entropy over every answer token of the global batch
(all micro-batches together), so accumulation gives the same update as one large batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from avllm_jax.modality import IGNORE_INDEX, Modality

# Per-sample groups reported as separate losses: each modality, then text-only samples.
LOSS_GROUPS = (*(m.value for m in Modality), "text")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # the trainable partition
    opt_state: optax.OptState


def loss_groups(batch) -> jax.Array:
    """float32 [B, len(LOSS_GROUPS)]: one-hot of each sample's group, from its flags."""
    visual, audio = batch["has_visual"], batch["has_audio"]
    columns = [(visual == m.has_visual) & (audio == m.has_audio) for m in Modality] + [~visual & ~audio]
    return jnp.stack(columns, axis=1).astype(jnp.float32)


def loss_sums(model, batch) -> tuple[jax.Array, dict]:
    """Summed cross-entropy over answer tokens, and per-group sums and counts."""
    hidden, inputs = model(batch, return_hidden_states=True)
    logits = model.llm.logits(hidden)
    targets = inputs["targets"]
    is_target = targets != IGNORE_INDEX
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(is_target, targets, 0))
    token_loss = jnp.where(is_target, token_loss, 0.0)
    per_sample_loss, per_sample_count = token_loss.sum(axis=1), is_target.sum(axis=1)
    groups = loss_groups(batch)
    aux = {
        "loss_sum": per_sample_loss.sum(),
        "target_tokens": per_sample_count.sum().astype(jnp.int32),
        "group_loss_sum": per_sample_loss @ groups,
        "group_tokens": per_sample_count.astype(jnp.float32) @ groups,
    }
    return aux["loss_sum"], aux


def split_microbatches(batch: dict, num_microbatches: int) -> dict:
    """[B, ...] -> [A, B/A, ...]; sample i goes to micro-batch i % A, so each micro-batch keeps
    the batch's data x fsdp layout."""

    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"batch of {x.shape[0]} is not divisible into {num_microbatches} micro-batches")
        return x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *, num_microbatches: int = 1):
    """train_step(state, frozen, batch) -> (state, metrics), jitted, the state donated."""

    def train_step(state: TrainState, frozen: nnx.State, batch: dict):
        def microbatch_grads(params, microbatch):
            def loss_fn(trainable):
                return loss_sums(nnx.merge(graphdef, trainable, frozen), microbatch)

            return jax.grad(loss_fn, has_aux=True)(params)

        zero_grads = jax.tree.map(jnp.zeros_like, state.params)
        zero_aux = {
            "loss_sum": jnp.zeros((), jnp.float32),
            "target_tokens": jnp.zeros((), jnp.int32),
            "group_loss_sum": jnp.zeros(len(LOSS_GROUPS), jnp.float32),
            "group_tokens": jnp.zeros(len(LOSS_GROUPS), jnp.float32),
        }

        def accumulate(carry, microbatch):
            grads, aux = microbatch_grads(state.params, microbatch)
            return jax.tree.map(jnp.add, carry, (grads, aux)), None

        (grad_sums, aux), _ = jax.lax.scan(accumulate, (zero_grads, zero_aux), split_microbatches(batch, num_microbatches))
        num_tokens = jnp.maximum(aux["target_tokens"], 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / num_tokens, grad_sums)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": aux["loss_sum"] / num_tokens,
            "grad_norm": optax.tree.norm(grads),
            "target_tokens": aux["target_tokens"],
        }
        group_loss = aux["group_loss_sum"] / jnp.maximum(aux["group_tokens"], 1)
        for index, name in enumerate(LOSS_GROUPS):
            # NaN marks a group absent from this batch, so averages over steps can skip it.
            metrics[f"loss/{name}"] = jnp.where(aux["group_tokens"][index] > 0, group_loss[index], jnp.nan)
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(train_step, donate_argnums=(0,))
