"""Continuous batching: requests join and leave a running decode batch at step boundaries.

The engine holds a KV cache of `max_batch` rows (slots) of `max_length` slots each, every row
with its own fill level (models/kv_cache.py). A request's prompt is prefilled alone, as
`stream_tokens` prefills it (a prompt in a batch computes what it computes alone: padding and
absent media rows are masked), then copied into a free row; every step then feeds one token
per row to the decoder, whichever request the row holds. Between two steps the engine makes
one prefill call, of the waiting prompts of one shape that free rows take (a power of two of
them), so new prompts' prefill is interleaved with the others' decoding; and it frees the rows
of requests that finished or were cancelled.

    engine = Engine(model, max_batch=8, max_length=1024)
    engine.start()                               # the decode loop, in a thread of its own
    engine.submit(Request(batch, max_new_tokens, eos_ids, emit=...))
    request.cancel()                             # the row is freed at the next step boundary

A request's tokens come to its `emit(token, finish_reason)` callback, called from the engine's
thread: `finish_reason` is None while it goes on; the last call has 'stop' (EOS, not emitted),
'length', 'cancelled' (once the row is freed) or 'error: ...' (its prefill failed: that
request's error, not the loop's). Every submitted request gets exactly one last call.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avllm_jax.inference.generate import MODEL_INPUT_KEYS, _model_batch, _prompt_inputs, greedy_tokens, prompt_forward
from avllm_jax.models.avllm import AVLLM
from avllm_jax.models.kv_cache import KVCache

log = logging.getLogger(__name__)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits float32 [B, V] -> int32 [B], each row with its own key, temperature (0: greedy)
    and nucleus mass: `generate.sample_tokens` with per-row settings (and no top_k)."""
    greedy = greedy_tokens(logits)

    def sampled(_):
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        descending = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        kept = jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]
        smallest_kept = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < smallest_kept, -jnp.inf, scaled)
        # One key per row, as a one-row batch draws it (the chat command's draws).
        draw = lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0]
        return jnp.where(temperature > 0, jax.vmap(draw)(keys, scaled).astype(jnp.int32), greedy)

    # The sort costs as much as a step on CPU: only batches with a sampled row pay it.
    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill_into_rows(graphdef, state, batch, keys, temperature, top_p, cache: KVCache, rows):
    """A batch of k prompts' first tokens and position counts, prompt i's cache written into row
    rows[i]: each prompt computes what it computes alone (padding and absent rows are masked)."""
    _, logits, prompt_cache, kept = prompt_forward(nnx.merge(graphdef, state), batch)
    count, prompt_length = kept.shape
    first = sample_rows(logits, keys, temperature, top_p)

    def place(whole, part, i):
        return jax.lax.dynamic_update_slice(whole, part[i : i + 1], (rows[i], 0, 0, 0))

    keys_, values, segment_ids = list(cache.keys), list(cache.values), cache.segment_ids
    for i in range(count):
        keys_ = [place(w, p, i) for w, p in zip(keys_, prompt_cache.keys)]
        values = [place(w, p, i) for w, p in zip(values, prompt_cache.values)]
        segment_ids = jax.lax.dynamic_update_slice(
            segment_ids.at[rows[i]].set(0), prompt_cache.segment_ids[i : i + 1], (rows[i], 0)
        )
    length = cache.length.at[rows].set(prompt_length)
    return first, kept.sum(axis=1).astype(jnp.int32), KVCache(tuple(keys_), tuple(values), segment_ids, length)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer_graphdef"), donate_argnames=("cache", "keys"))
def _step(graphdef, state, layer_graphdef, layer_states, cache, tokens, positions, keys, temperature, top_p):
    """One token for every row; returns the next tokens, the cache and the rows' next keys."""
    llm = nnx.merge(graphdef, state)
    unstacked = [nnx.merge(layer_graphdef, s) for s in layer_states]
    logits, cache = llm(tokens[:, None], positions=positions[:, None], cache=cache, unstacked=unstacked)
    pairs = jax.vmap(jax.random.split)(keys)
    return sample_rows(logits[:, 0], pairs[:, 1], temperature, top_p), cache, pairs[:, 0]


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt to answer. batch: a one-row model batch (`prompts.conversation_batch`);
    key: a jax.random key, drawn from as the chat command draws from its turn key."""

    batch: dict
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    emit: Callable[[int | None, str | None], None]
    temperature: float = 0.0
    top_p: float = 1.0
    key: jax.Array | None = None
    prompt_tokens: int = 0  # set at prefill: the decoder rows the prompt fills, media included
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass
class _Row:
    request: Request
    generated: int = 0


def _shapes(batch: dict) -> tuple:
    return tuple(sorted((k, np.shape(v)) for k, v in batch.items()))


class Engine:
    """The slot-based decode loop over `model` (an AVLLM with an LLM). Thread-safe `submit`."""

    def __init__(self, model: AVLLM, *, max_batch: int, max_length: int):
        if model.llm is None:
            raise ValueError("the model has no LLM to decode with")
        self.max_batch, self.max_length = max_batch, max_length
        self._graphdef, self._state = nnx.split(model)
        llm = model.llm
        self._llm_graphdef, self._llm_state = nnx.split(llm)
        layers = [nnx.split(layer) for layer in llm.unstack_layers()]  # once: see Llama.unstack_layers
        self._layer_graphdef, self._layer_states = layers[0][0], tuple(state for _, state in layers)
        self._llm_config = llm.config
        self._cache = KVCache.create(llm.config, max_batch, max_length, per_row=True)
        self._tokens = np.zeros(max_batch, np.int32)
        self._positions = np.zeros(max_batch, np.int32)
        self._temperature = np.zeros(max_batch, np.float32)
        self._top_p = np.ones(max_batch, np.float32)
        self._keys = jax.random.split(jax.random.key(0), max_batch)
        self._rows: list[_Row | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._prompt_slots: dict[tuple, int] = {}  # by the batch's array shapes
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="avllm-engine", daemon=True)
        self.finished: collections.Counter[str] = collections.Counter()  # finish reasons, 'cancelled', 'error'
        self.prefills: collections.Counter[str] = collections.Counter()  # prefill 'calls', the 'prompts' they took

    # -- the caller's side ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join()

    def prompt_slots(self, batch: dict) -> int:
        """The cache slots a one-prompt batch fills: its decoder rows, media rows included."""
        inputs = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
        inputs = {k: v for k, v in inputs.items() if k in MODEL_INPUT_KEYS}
        signature = tuple(sorted((k, v.shape) for k, v in inputs.items()))
        if signature not in self._prompt_slots:
            merge = lambda b: _prompt_inputs(nnx.merge(self._graphdef, self._state), b)[1]["segment_ids"]
            self._prompt_slots[signature] = jax.eval_shape(merge, inputs).shape[1]
        return self._prompt_slots[signature]

    def check_fits(self, request: Request) -> None:
        """ValueError when the request's prompt and answer cannot fit in a row of the cache."""
        slots = self.prompt_slots(request.batch)
        if slots + request.max_new_tokens - 1 > self.max_length:
            raise ValueError(
                f"the prompt's {slots} positions (media included) and max_tokens {request.max_new_tokens} exceed "
                f"the server's {self.max_length} positions per request (--max-length)"
            )

    def submit(self, request: Request) -> None:
        self.check_fits(request)
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()

    @property
    def active(self) -> int:
        return sum(row is not None for row in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the engine's thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._waiting and not self.active:
                    self._wake.wait()
                if self._stopped:
                    return
                admitted = self._next_prompts()
            self._free_cancelled()
            live = [r for r in admitted if not r.cancelled]
            for request in admitted:
                if request.cancelled:
                    self.finished["cancelled"] += 1
                    request.emit(None, "cancelled")
            if live:
                self._admit(live)
            if self.active:
                try:
                    self._decode()
                except Exception as error:  # the rows' requests fail; the server goes on with new ones
                    log.exception("decode step failed")
                    self._fail_rows(f"error: {error}")

    def _fail_rows(self, reason: str) -> None:
        """Ends every row's request with `reason`, on a fresh cache: the failed step may have
        consumed the donated one."""
        self._cache = KVCache.create(self._llm_config, self.max_batch, self.max_length, per_row=True)
        self._keys = jax.random.split(jax.random.key(0), self.max_batch)
        for i, row in enumerate(self._rows):
            if row is not None:
                self._rows[i] = None
                self._temperature[i] = 0
                self.finished["error"] += 1
                row.request.emit(None, reason)

    def _next_prompts(self) -> list[Request]:
        """The waiting requests to prefill now, in one call: the first, and as many after it of
        the same prompt shape as free rows allow, a power of two of them (one compiled prefill
        per count and shape)."""
        free = self._rows.count(None)
        if not self._waiting or not free:
            return []
        signature = _shapes(self._waiting[0].batch)
        alike = [r for r in self._waiting if _shapes(r.batch) == signature][:free]
        taken = alike[: 1 << (len(alike).bit_length() - 1)]
        for request in taken:
            self._waiting.remove(request)
        return taken

    def _free_cancelled(self) -> None:
        for i, row in enumerate(self._rows):
            if row is not None and row.request.cancelled:
                self._rows[i] = None
                self._temperature[i] = 0
                self.finished["cancelled"] += 1
                row.request.emit(None, "cancelled")
        with self._wake:
            gone = [r for r in self._waiting if r.cancelled]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            self.finished["cancelled"] += 1
            request.emit(None, "cancelled")

    def _admit(self, requests: list[Request]) -> None:
        rows = [i for i, row in enumerate(self._rows) if row is None][: len(requests)]
        # Each request's key is split as stream_tokens splits its key: (decoding, prefill).
        pairs = [jax.random.split(jax.random.key(0) if r.key is None else r.key) for r in requests]
        try:
            first, positions, self._cache = _prefill_into_rows(
                self._graphdef,
                self._state,
                _model_batch({k: np.concatenate([r.batch[k] for r in requests]) for k in requests[0].batch}),
                jnp.stack([pair[1] for pair in pairs]),
                jnp.asarray([r.temperature for r in requests], jnp.float32),
                jnp.asarray([r.top_p for r in requests], jnp.float32),
                self._cache,
                jnp.asarray(rows, jnp.int32),
            )
            first, positions = np.asarray(first), np.asarray(positions)
            self.prefills.update(calls=1, prompts=len(requests))
        except Exception as error:  # the requests' error, reported to them; the loop goes on
            log.exception("prefill failed")
            for request in requests:
                self.finished["error"] += 1
                request.emit(None, f"error: {error}")
            return
        for i, (row, request) in enumerate(zip(rows, requests)):
            request.prompt_tokens = int(positions[i])
            self._rows[row] = _Row(request)
            self._tokens[row], self._positions[row] = first[i], positions[i]
            self._temperature[row], self._top_p[row] = request.temperature, request.top_p
            self._keys = self._keys.at[row].set(pairs[i][0])
            self._deliver(row, int(first[i]))

    def _decode(self) -> None:
        tokens, self._cache, self._keys = _step(
            self._llm_graphdef,
            self._llm_state,
            self._layer_graphdef,
            self._layer_states,
            self._cache,
            jnp.asarray(self._tokens),
            jnp.asarray(self._positions),
            self._keys,
            jnp.asarray(self._temperature),
            jnp.asarray(self._top_p),
        )
        self._tokens = np.array(tokens)
        self._positions += 1
        for row, held in enumerate(self._rows):
            if held is not None and not held.request.cancelled:
                self._deliver(row, int(self._tokens[row]))

    def _deliver(self, row: int, token: int) -> None:
        """Hands the row's new token to its request, and frees the row when the answer ends."""
        held = self._rows[row]
        assert held is not None, f"row {row} holds no request"
        reason: str | None
        if token in held.request.eos_ids:
            reason = "stop"
        else:
            held.generated += 1
            reason = "length" if held.generated >= held.request.max_new_tokens else None
        if reason is not None:
            self._rows[row] = None
            self._temperature[row] = 0  # an empty row must not make the others pay for sampling
            self.finished[reason] += 1
        held.request.emit(None if reason == "stop" else token, reason)
