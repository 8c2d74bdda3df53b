"""Projectors that start where the LLM reads its words (`config.projector_init = "centred"`).

A linear projector at its random initialisation hands the LLM rows far from its token
embeddings: the frozen encoder's outputs share a large common part (the demo's random CLIP:
class tokens of norm 22 that vary by 5 between frames), so the rows are nearly parallel and
hundreds of times longer than a word's embedding (23 against 0.29 in the demo). The LLM
normalises each row, so what tells the frames apart is a few percent of what it reads, and
stage 1, which trains only the projectors through the frozen LLM, did not get them out of it
(docs/demo.md measures both starts).

`centre_projectors` keeps each projector's directions and moves its output: over the rows that
the run's first batches place in the LLM's input, the mean output is subtracted (into the bias)
and the result scaled so that the rows' root-mean-square norm is the token embeddings'. With
kernel W and bias b, rows o = W f + b of mean m and spread s become (o - m) * t / s, that is
W' = W t / s and b' = (b - m) t / s. The paper starts from random projectors; this is an
initialisation only, no layer is added, and it runs once, at the start of a run that has no
checkpoint to resume (a resumed run restores the projectors it trained).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

logger = logging.getLogger(__name__)

# "random": the projectors as the model or its init_checkpoint has them.
INITS = ("random", "centred")


def row_sums(model, batch: dict) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    """Per projector, over the modality table rows that the packed `batch` places in the LLM's
    input (modality_index; a slot no sample fills is left out): (the sum of the rows [D], the
    sum of their squared entries, their count)."""
    parts = model.projected_rows(batch)
    packs = batch["modality_index"].shape[0]
    index = batch["modality_index"].reshape(packs, -1)
    table_size = sum(rows.shape[1] for rows in parts.values())
    used = jnp.zeros((packs, table_size), bool).at[jnp.arange(packs)[:, None], jnp.maximum(index, 0)].max(index >= 0)
    sums, start = {}, 0
    for name, rows in parts.items():
        weight = used[:, start : start + rows.shape[1], None].astype(jnp.float32)
        start += rows.shape[1]
        rows = rows.astype(jnp.float32)
        sums[name] = (jnp.sum(weight * rows, axis=(0, 1)), jnp.sum(weight * rows**2), jnp.sum(weight))
    return sums


def centre_projectors(model, batches: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Sets each projector's kernel and bias as the module docstring says, from the rows of
    `batches` (packed, sharded as training's); returns per projector the rows counted and their
    RMS norm before and after. A projector whose rows the batches never use is left as it is."""
    graphdef, state = nnx.split(model)
    sums_of = jax.jit(lambda state, batch: row_sums(nnx.merge(graphdef, state), batch))
    totals: dict[str, list] = {}
    for batch in batches:
        for name, values in jax.device_get(sums_of(state, batch)).items():
            previous = totals.setdefault(name, [0.0, 0.0, 0.0])
            totals[name] = [a + np.asarray(b, np.float64) for a, b in zip(previous, values, strict=True)]
    embeddings = model.language_model.embed[...].astype(jnp.float32)
    target = float(jnp.sqrt(jnp.mean(jnp.sum(embeddings**2, axis=-1))))
    report = {}
    for name, (row_sum, square_sum, count) in totals.items():
        if count == 0:
            logger.warning(f"projector_init: no row of {name} in the batches read; it keeps its random start")
            continue
        mean = row_sum / count
        spread = float(np.sqrt(max(square_sum / count - np.sum(mean**2), 0.0)))
        if spread == 0.0:
            raise ValueError(f"projector_init: every row of {name} is the same; there is nothing to scale")
        scale = target / spread
        projector = getattr(model, name)
        projector.kernel[...] = projector.kernel[...] * scale
        projector.bias[...] = (projector.bias[...] - jnp.asarray(mean, projector.bias.dtype)) * scale
        before = float(np.sqrt(square_sum / count))
        report[name] = {"rows": int(count), "rms_norm_before": before, "rms_norm_after": target}
        logger.info(
            f"projector_init centred: {name} over {int(count):,} rows, RMS norm {before:.3g} -> {target:.3g} "
            "(the token embeddings')"
        )
    return report


def fit_projector(projector, inputs: np.ndarray, targets: np.ndarray, ridge: float = 1e-3) -> float:
    """Sets `projector`'s kernel and bias to the ridge regression of `targets` [R, D] on `inputs`
    [R, Din] (the encoder outputs it reads, one row each; the penalty `ridge` times the inputs'
    mean squared entry per feature), so that its rows start at the targets: the demo fits its
    stage 1's start to the embeddings of the words each row stands for (tools/demo.py,
    align_projectors). Returns the fraction of the targets' variance the fit explains."""
    x = np.c_[np.asarray(inputs, np.float64), np.ones(len(inputs))]
    y = np.asarray(targets, np.float64)
    penalty = ridge * np.mean(np.sum(x**2, axis=0)) * np.eye(x.shape[1])
    weights = np.linalg.solve(x.T @ x + penalty, x.T @ y)
    projector.kernel[...] = jnp.asarray(weights[:-1], projector.kernel.dtype)
    projector.bias[...] = jnp.asarray(weights[-1], projector.bias.dtype)
    residual = y - x @ weights
    return float(1.0 - np.sum(residual**2) / np.sum((y - y.mean(0)) ** 2))
