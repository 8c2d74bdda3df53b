"""Text generation with a KV cache: batched prefill, then decoding in compiled loops.

A prompt batch is right-padded. The whole padded prompt fills the first S cache slots in one
prefill pass (padding and absent-modality rows carry segment id 0, so no token sees them);
generated tokens go in the slots after it. Each row's first new token comes from the logits at
its last kept slot, and its next position is its count of kept rows, so every row of a padded,
mixed-modality batch generates what it generates alone.

    generate(model, batch, ...)          batch generation: one jit, `lax.while_loop`s (one per
                                         cache length, see DECODE_PHASES) that stop when every
                                         row has produced EOS
    stream_tokens(model, batch, ...)     one token at a time (for chat): a per-token step function
                                         jitted once, the host reads each token as it comes

Prompt batches about media are built in avllm_jax/inference/prompts.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from avllm_jax.models.avllm import AVLLM, ENCODER_OUTPUTS
from avllm_jax.models.kv_cache import KVCache
from avllm_jax.models.llama import Llama, kept_positions

MODEL_INPUT_KEYS = (
    "frames",
    "audio_features",
    "audio_is_longer",
    "audio_valid_frames",
    *ENCODER_OUTPUTS,
    "has_visual",
    "has_audio",
    "input_ids",
    "token_mask",
)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise softmax(logits / temperature), cut to the `top_k` most
    likely tokens (0: no cut) and to the smallest set whose probability reaches `top_p`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY_BLOCK = 128


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, axis=-1)` (the first maximum) as int32, for logits without NaN.

    XLA on CPU computes an argmax as a (value, index) reduction that it does not vectorize: over
    [32, 32000] it took 4.7 ms on two cores, as long as the LM head's matmul. Here a plain max
    reduces each block of GREEDY_BLOCK logits, and argmax runs only over the block maxima and
    over the one block that holds the first maximum: 0.2 ms."""
    batch, vocab = logits.shape
    size = min(GREEDY_BLOCK, vocab)
    full = vocab // size
    blocks = logits[:, : full * size].reshape(batch, full, size)
    # The vocab % size last logits, padded to a block that never wins a tie with a real one.
    tail = jnp.pad(logits[:, full * size :], ((0, 0), (0, size - vocab % size)), constant_values=-jnp.inf)
    block = jnp.argmax(jnp.concatenate([blocks.max(axis=-1), tail.max(axis=-1, keepdims=True)], axis=1), axis=1)
    chosen = jnp.take_along_axis(blocks, jnp.minimum(block, full - 1)[:, None, None], axis=1)[:, 0]
    chosen = jnp.where((block < full)[:, None], chosen, tail)
    return (block * size + jnp.argmax(chosen, axis=1)).astype(jnp.int32)


def sample_tokens(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """logits float32 [B, V] -> int32 [B]."""
    if sampling.temperature == 0:
        return greedy_tokens(logits)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p < 1:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        # A token is kept while the mass of the tokens above it is below top_p (the first always is).
        kept = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
        smallest_kept = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# -- the compiled pieces ------------------------------------------------------------------------


def _prompt_inputs(model: AVLLM | Llama, batch: dict) -> tuple[Llama, dict]:
    """The decoder and its inputs_embeds / positions / segment_ids for a prompt batch."""
    if isinstance(model, AVLLM):
        inputs = model.embed_inputs(batch)
        return model.language_model, {k: inputs[k] for k in ("inputs_embeds", "positions", "segment_ids")}
    kept = batch["token_mask"].astype(jnp.int32)
    positions = kept_positions(kept)
    return model, {"inputs_embeds": model.embed_tokens(batch["input_ids"]), "positions": positions, "segment_ids": kept}


def prompt_forward(model: AVLLM | Llama, batch: dict) -> tuple[Llama, jax.Array, KVCache, jax.Array]:
    """A prompt batch through the decoder: (decoder, the logits at each row's last kept token
    [B, V], the cache of the prompt's slots, which positions are kept [B, L])."""
    llm, inputs = _prompt_inputs(model, batch)
    batch_size, prompt_length = inputs["segment_ids"].shape
    cache = KVCache.create(llm.config, batch_size, prompt_length)
    hidden, cache = llm(**inputs, cache=cache, return_hidden_states=True)
    kept = inputs["segment_ids"] > 0
    last_kept = prompt_length - 1 - jnp.argmax(kept[:, ::-1], axis=1)
    logits = llm.logits(jnp.take_along_axis(hidden, last_kept[:, None, None], axis=1))[:, 0]
    return llm, logits, cache, kept


def _prefill(model, batch, rng, *, sampling: Sampling):
    """Prompt -> (decoder, first new tokens [B], cache of the prompt's slots, next positions [B])."""
    llm, logits, cache, kept = prompt_forward(model, batch)
    return llm, sample_tokens(logits, rng, sampling), cache, kept.sum(axis=1).astype(jnp.int32)


# Decoding runs in up to DECODE_PHASES loops of at least MIN_PHASE_SLOTS steps, each with a cache
# only as long as it fills: attention reads every slot of the cache array, filled or not (a
# quarter of a step at batch 32). Each phase compiles its own loop body and copies the cache
# into a longer one once.
DECODE_PHASES = 4
MIN_PHASE_SLOTS = 32


def _cache_windows(prompt_length: int, max_new_tokens: int) -> list[int]:
    """The cache length of each decoding phase. Step s (1 to max_new_tokens - 1) writes slot
    prompt_length + s - 1; the prefill made token 0."""
    slots = max_new_tokens - 1
    phases = max(1, min(DECODE_PHASES, slots // MIN_PHASE_SLOTS))
    chunk = -(-slots // phases)
    return [prompt_length + min(slots, k * chunk) for k in range(1, phases + 1)]


def _decode_step(llm: Llama, cache: KVCache, tokens, positions, rng, sampling: Sampling, unstacked=None):
    """Feeds one token per row at `positions`; returns the sampled next tokens and the cache.
    `unstacked`: the decoder's layers taken out of their stack before a loop of steps."""
    logits, cache = llm(tokens[:, None], positions=positions[:, None], cache=cache, unstacked=unstacked)
    return sample_tokens(logits[:, 0], rng, sampling), cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _DecodeLoop:
    """What the decoding loop carries from one step to the next."""

    step: jax.Array  # int32 scalar: the index in `tokens` this step writes
    previous: jax.Array  # int32 [B]: the tokens the last step made, fed to this one
    positions: jax.Array  # int32 [B]: their position ids
    done: jax.Array  # bool [B]: rows that have produced EOS
    tokens: jax.Array  # int32 [B, max_new_tokens]
    cache: KVCache
    rng: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"))
def _generate_compiled(graphdef, state, batch, rng, eos_ids, pad_id, *, max_new_tokens, sampling):
    """eos_ids int32 [E] (-1 matches nothing); pad_id int32 scalar. Traced, so they cost no recompile."""
    model = nnx.merge(graphdef, state)
    rng, prefill_rng = jax.random.split(rng)
    llm, first, cache, positions = _prefill(model, batch, prefill_rng, sampling=sampling)
    unstacked = llm.unstack_layers()  # once, outside the loop (see Llama.unstack_layers)
    is_eos = lambda t: jnp.isin(t, eos_ids)
    tokens = jnp.full((first.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    prompt_length = cache.segment_ids.shape[1]

    def keep_going(loop: _DecodeLoop, last_step):
        return (loop.step <= last_step) & ~jnp.all(loop.done)

    def decode(loop: _DecodeLoop) -> _DecodeLoop:
        rng, step_rng = jax.random.split(loop.rng)
        token, cache = _decode_step(llm, loop.cache, loop.previous, loop.positions, step_rng, sampling, unstacked)
        token = jnp.where(loop.done, pad_id, token)
        return _DecodeLoop(
            step=loop.step + 1,
            previous=token,
            positions=loop.positions + 1,
            done=loop.done | is_eos(token),
            tokens=jax.lax.dynamic_update_slice(loop.tokens, token[:, None], (0, loop.step)),
            cache=cache,
            rng=rng,
        )

    loop = _DecodeLoop(jnp.int32(1), first, positions, is_eos(first), tokens, cache, rng)
    for window in _cache_windows(prompt_length, max_new_tokens):
        # The phase ends with the step that writes the window's last slot.
        last_step = window - prompt_length
        loop = jax.lax.while_loop(
            functools.partial(keep_going, last_step=last_step),
            decode,
            dataclasses.replace(loop, cache=loop.cache.padded(window)),
        )
    tokens = loop.tokens
    ended = is_eos(tokens)
    lengths = jnp.where(ended.any(axis=1), jnp.argmax(ended, axis=1), max_new_tokens).astype(jnp.int32)
    return tokens, lengths


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"))
def _prefill_compiled(graphdef, state, batch, rng, *, max_new_tokens, sampling):
    _, first, cache, positions = _prefill(nnx.merge(graphdef, state), batch, rng, sampling=sampling)
    return first, cache.padded(cache.segment_ids.shape[1] + max_new_tokens - 1), positions


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _step_compiled(graphdef, state, cache, tokens, positions, rng, *, sampling):
    return _decode_step(nnx.merge(graphdef, state), cache, tokens, positions, rng, sampling)


# -- public API -----------------------------------------------------------------------------------


class Generated(NamedTuple):
    tokens: jax.Array  # int32 [B, max_new_tokens]; the EOS is kept, the slots after it hold pad_id
    lengths: jax.Array  # int32 [B]: tokens before the first EOS (max_new_tokens if none)


def _model_batch(batch: dict) -> dict:
    """The arrays the model reads, with a checked token mask (every row needs a token)."""
    if "input_ids" not in batch:
        raise ValueError("the batch needs 'input_ids' (and 'token_mask' when right-padded)")
    inputs = {k: jnp.asarray(batch[k]) for k in MODEL_INPUT_KEYS if k in batch}
    if "token_mask" not in inputs:
        inputs["token_mask"] = jnp.ones(inputs["input_ids"].shape, bool)
    empty = np.flatnonzero(~np.asarray(inputs["token_mask"]).any(axis=1))
    if empty.size:
        raise ValueError(f"prompt rows {empty.tolist()} have no tokens (token_mask all False)")
    return inputs


_Model = TypeVar("_Model", AVLLM, Llama)


def replicate(model: _Model, mesh: jax.sharding.Mesh) -> _Model:
    """The model with every parameter copied onto each device of `mesh`, as `generate(...,
    mesh=mesh)` takes it."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))


def _split_rows(inputs: dict, mesh: jax.sharding.Mesh) -> dict:
    """The batch's rows split over the mesh's devices, padded to a multiple of their number by
    repeating the last row (whose extra results are dropped)."""
    rows = inputs["input_ids"].shape[0]
    extra = -rows % mesh.size
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    return {
        k: jax.device_put(jnp.concatenate([v, jnp.repeat(v[-1:], extra, axis=0)]) if extra else v, sharding)
        for k, v in inputs.items()
    }


def _eos_tuple(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    return tuple(int(i) for i in np.atleast_1d(eos_token_id))


def generate(
    model: AVLLM | Llama,
    batch: dict,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    pad_token_id: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Generated:
    """Up to `max_new_tokens` new tokens for each prompt of a right-padded batch.

    model: an AVLLM (batch: the pipeline's arrays, see avllm_jax/data/pipeline.py; extra keys
    such as labels are ignored) or a Llama
    alone (batch: `input_ids` and optional `token_mask`). A row stops at its first EOS
    (`eos_token_id`: one id, several, or None for never); the loop stops when all rows have.
    rng: a jax.random key for sampling (default key 0); unused when greedy.
    pad_token_id: fills the slots after EOS (default: the first EOS id, else 0).
    mesh: splits the rows over its devices; the model is on the same mesh, copied onto each
    device (`replicate`) or laid out by training's shardings (each step then gathers weights).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    eos_ids = _eos_tuple(eos_token_id)
    pad_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    graphdef, state = nnx.split(model)
    inputs = _model_batch(batch)
    rows = inputs["input_ids"].shape[0]
    tokens, lengths = _generate_compiled(
        graphdef,
        state,
        inputs if mesh is None else _split_rows(inputs, mesh),
        jax.random.key(0) if rng is None else rng,
        jnp.asarray(eos_ids or (-1,), jnp.int32),
        jnp.int32(pad_id),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
    )
    return Generated(tokens[:rows], lengths[:rows])


def stream_tokens(
    model: AVLLM | Llama,
    batch: dict,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Iterator[int]:
    """Yields the new token ids of a one-prompt batch as they are generated, EOS excluded.

    Computes what `generate` computes (same prefill, step and sampling), one compiled step per
    token, so a caller can show each piece as soon as it exists.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    inputs = _model_batch(batch)
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"stream_tokens takes one prompt, got a batch of {inputs['input_ids'].shape[0]}")
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    eos_ids = set(_eos_tuple(eos_token_id))
    rng = jax.random.key(0) if rng is None else rng
    rng, prefill_rng = jax.random.split(rng)
    graphdef, state = nnx.split(model)
    token, cache, positions = _prefill_compiled(
        graphdef, state, inputs, prefill_rng, max_new_tokens=max_new_tokens, sampling=sampling
    )
    llm_graphdef, llm_state = nnx.split(model.language_model if isinstance(model, AVLLM) else model)
    for step in range(max_new_tokens):
        value = int(token[0])
        if value in eos_ids:
            return
        yield value
        if step + 1 == max_new_tokens:
            return
        rng, step_rng = jax.random.split(rng)
        token, cache = _step_compiled(llm_graphdef, llm_state, cache, token, positions, step_rng, sampling=sampling)
        positions = positions + 1
