"""A stand-in for CLIP's pretraining, for the CPU demo, where nothing can be downloaded
(`python tools/demo.py --vision-standin-steps 2000`; an option, measured in docs/demo.md).

The paper's frozen CLIP already tells colours, shapes and where a thing is in a picture. A random
tower does not: in the demo's random CLIP the place of a shape explains 6% of the variance of a
frame's class token and colour and shape are held as pairs, so the LLM read the frames' colours
in order but not a shape's hops, and named no unseen colour × shape pair (docs/demo.md). Here the
tower learns from still pictures (draw_stills: any of seven colours, any shape,
anywhere, every colour with every shape) what CLIP's image-text pretraining gives it about such
pictures: a linear read-out of its class token (the row the paper's temporal tokens come from)
names the colour and the shape and gives the shape's centre. The read-out is dropped afterwards;
the tower is frozen from there on, as the paper freezes CLIP.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from avllm_jax.data import synthetic
from avllm_jax.models import clip_vision

logger = logging.getLogger(__name__)

CENTRE_SCALE = 16.0  # pixels per unit of the centre's regression target, about a shape's half size


def draw_stills(count: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`count` still pictures to pretrain on, uint8 [count, 64, 64, 3], and per picture its
    "colour" (index into synthetic.STILL_COLOURS), "shape" (index into synthetic.SHAPES) and
    "centre" (x, y in pixels, float32 [count, 2]).

    One shape as the clips draw it, of any of the seven colours, centred anywhere from 10 to 54 px
    on either axis (not only at the clips' stops and lane; the frame's edge may cut it), every
    colour with every shape: a pretrained CLIP has seen red circles, though the demo's training
    clips hold that pair out (synthetic.HELD_OUT)."""
    size = synthetic.FRAME_SIZE
    yy, xx = np.mgrid[:size, :size] + 0.5
    colour = rng.integers(len(synthetic.STILL_COLOURS), size=count)
    shape = rng.integers(len(synthetic.SHAPES), size=count)
    half = rng.integers(synthetic.SHAPE_HALF_SIZES[0], synthetic.SHAPE_HALF_SIZES[1] + 1, size=count)
    centre = rng.uniform(10, size - 10, size=(count, 2)).astype(np.float32)  # the clips' stops are 14 to 50
    frames = np.zeros((count, size, size, 3), np.uint8)
    rgb = list(synthetic.STILL_COLOURS.values())
    for i in range(count):
        inside = synthetic.shape_mask(synthetic.SHAPES[shape[i]], xx - centre[i, 0], yy - centre[i, 1], int(half[i]))
        frames[i][inside] = rgb[colour[i]]
    return frames, {"colour": colour, "shape": shape, "centre": centre}


def pretrain_vision(
    vision: clip_vision.CLIPVision,
    *,
    steps: int = 2000,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
    log_every: int = 200,
) -> dict[str, float]:
    """Trains `vision` in place on stills (AdamW, cosine decay from `learning_rate`) and returns
    what its read-out gets right on 1024 stills it never saw: "colour" and "shape" (accuracy) and
    "centre error px" (root mean square, pixels)."""
    num_colours, num_shapes = len(synthetic.STILL_COLOURS), len(synthetic.SHAPES)
    width = vision.config.hidden_size
    graphdef, tower = nnx.split(vision)
    readout = {
        "kernel": jax.random.normal(jax.random.PRNGKey(seed), (width, num_colours + num_shapes + 2)) / np.sqrt(width),
        "bias": jnp.zeros(num_colours + num_shapes + 2),
    }
    params = {"tower": tower, "readout": readout}
    optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=0.01)

    def outputs(params, frames):
        class_token = nnx.merge(graphdef, params["tower"])(clip_vision.normalize_frames(frames))[:, 0]
        logits = class_token @ params["readout"]["kernel"] + params["readout"]["bias"]
        return logits[:, :num_colours], logits[:, num_colours:-2], logits[:, -2:] * CENTRE_SCALE

    def loss_fn(params, frames, labels):
        colour, shape, centre = outputs(params, frames)
        return (
            optax.softmax_cross_entropy_with_integer_labels(colour, labels["colour"]).mean()
            + optax.softmax_cross_entropy_with_integer_labels(shape, labels["shape"]).mean()
            + jnp.mean(((centre - labels["centre"]) / CENTRE_SCALE) ** 2)
        )

    @jax.jit
    def train_step(params, opt_state, frames, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, frames, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def scores(params, frames, labels):
        colour, shape, centre = outputs(params, frames)
        return {
            "colour": jnp.mean(jnp.argmax(colour, -1) == labels["colour"]),
            "shape": jnp.mean(jnp.argmax(shape, -1) == labels["shape"]),
            "centre error px": jnp.sqrt(jnp.mean((centre - labels["centre"]) ** 2)),
        }

    rng = np.random.default_rng(seed)
    held_out = draw_stills(1024, np.random.default_rng(seed + 1))
    opt_state = optimizer.init(params)
    start = time.time()
    for step in range(1, steps + 1):
        params, opt_state, loss = train_step(params, opt_state, *draw_stills(batch_size, rng))
        if step % log_every == 0 or step == steps:
            logger.info("vision stand-in step %d/%d | loss %.4f | %.0f s", step, steps, loss, time.time() - start)
    nnx.update(vision, params["tower"])
    return {name: float(value) for name, value in scores(params, *held_out).items()}
