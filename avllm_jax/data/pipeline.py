"""The grain input pipeline: instruction samples -> decoded, tokenised, fixed-shape batches.

    sources (JSONL / LLaVA / Valley files), each shuffled by seed and epoch and repeated
      -> mixed by weight -> this host's shard
      -> decode + features + tokenise (build_sample, as inference builds a prompt),
         drop and count failures, stop past the bad fraction
      -> packed (data.packing.enabled): whole samples placed into packs over a look-ahead window
         (data/packer.py; data/packing.py describes a pack), global_batch_size / process_count a batch
         unpacked: batches of global_batch_size / process_count samples
      (in worker processes unless worker_count is 0)

An unpacked batch is a dict of numpy arrays, leading dimension B (the per-host batch):

    frames            uint8   [B, T, S, S, 3]  zeros when the sample has no picture;
                                               a still image is repeated over T
    audio_features    float32 [B, K, C, F, 64] CLAP log-mel; zeros when there is no audio
    audio_is_longer   bool    [B, K]
      (a Whisper model: audio_features float32 [B, mel, 3000], audio_valid_frames int32 [B, K])
    has_visual        bool    [B]
    has_audio         bool    [B]
    input_ids         int32   [B, L]           right-padded with the pad (or EOS) id
    labels            int32   [B, L]           IGNORE_INDEX except on answers and their EOS;
                                               aligned with input_ids (the model shifts them)
    token_mask        bool    [B, L]           True on real tokens
    work              float32 [B, len(WORK)]   the sample's useful work (packing.WORK), when
                                               the iterator is given the model's modality_rows
    num_skipped_media int32   [B]              samples dropped just before this one because
                                               their file raised MediaError or had no stream
    num_skipped_text  int32   [B]              ... because the prompt did not fit max_text_length
    num_rerouted      int32   [B]              1 when this sample's modality was changed to
                                               the streams its file has
    num_truncated     int32   [B]              1 when its text was cut to fit
    skipped_reasons   str     [B]              "file:line: reason" of each sample dropped just
                                               before this one, one a line ("" for none)

A packed batch has the same counters, per pack, summed over its samples. Summing a counter
over batches gives the total for this host (the counters and reasons travel in the batch
because the worker processes that find them share nothing with the trainer). Each sample's
prompt holds one modality token matching (has_visual, has_audio), or none for a text-only
sample. Malformed lines are found when the files are read, before training starts.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal

import grain
import ml_collections
import numpy as np
import threadpoolctl
from absl import flags

from avllm_jax import runtime
from avllm_jax.data import conversation, feature_cache, packer, packing, position
from avllm_jax.data.media import MediaError
from avllm_jax.data.samples import build_sample, load_sample_media, media_shapes, pad_text, routed_modality
from avllm_jax.errors import AvllmError
from avllm_jax.modality import MODALITY_TOKENS

logger = logging.getLogger(__name__)

_SKIP_COUNTERS = ("num_skipped_media", "num_skipped_text")
COUNTERS = (*_SKIP_COUNTERS, "num_rerouted", "num_truncated")
_MAX_LISTED_FAILURES = 10


class DataError(AvllmError, RuntimeError):
    """Too many bad samples: the input data, not the model, needs fixing."""


# Renamed: the training config had fields of these names that meant other things (old -> new).
RENAMED_DATA_FIELDS = {"seed": "shuffle_seed", "num_epochs": "source_epochs"}


def default_data_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Each source: path (.jsonl, or a LLaVA/Valley .json array), media_root (None: the file's
    # directory), weight (relative share of the mixture).
    config.sources = (dict(path="", media_root=None, weight=1.0),)  # a tuple: overridable on the command line
    config.num_frames = 32
    config.image_size = 224
    config.num_audio_segments = 4
    # A feature cache directory (tools/cache_features.py, data/feature_cache.py): each sample's
    # encoder outputs are read from it instead of decoding its file and running the encoders.
    config.feature_cache = ml_collections.FieldReference(None, field_type=str)
    # The audio encoder's front end: "clap" (an HTSAT model: CLAP's log-mel of each segment, at
    # 48 kHz) or "whisper" (a Whisper model: Whisper's log-mel of the clip's first 30 s, at 16 kHz).
    config.audio_front_end = "clap"
    config.audio_sample_rate = 48000  # audio is resampled to it when decoded; 16000 for Whisper
    # CLAP only:
    config.audio_max_length_s = 10.0  # CLAP window per segment: F = 1 + rate * length // 480
    config.audio_truncation = "fusion"  # "fusion" (4 mel channels) or "rand_trunc" (1)
    config.audio_padding = "repeatpad"  # "repeatpad", "repeat" or "pad"
    # Whisper only: the checkpoint's num_mel_bins, 80 (tiny ... large-v2) or 128 (large-v3).
    config.whisper_mel_bins = 80
    config.max_text_length = 512  # text tokens of a sample (the modality token's rows not counted)
    # Packing (docs/packing.md): global_batch_size then counts packs, each of `rows` LLM rows of
    # `row_length` positions holding whole samples, ViT slots for `frames` frames (a video takes
    # num_frames, a still 1) of up to `visual_items` videos and images, `audio_clips` clips of
    # num_audio_segments segments; the packer fills them over a `window` of samples. Off: every
    # sample has its own row of max_text_length - 1 + T + N + K positions and video and audio slots.
    config.packing = ml_collections.ConfigDict(
        dict(enabled=False, rows=1, row_length=2048, frames=128, visual_items=6, audio_clips=6, window=32)
    )
    config.shuffle_seed = 0  # the order of each source's samples, and the random audio crops
    # Passes over each source's samples (None: forever); the mixture ends with the first source's.
    config.source_epochs = ml_collections.FieldReference(None, field_type=int)
    config.worker_count = 4  # decoding processes per host; 0 decodes in the main process
    config.worker_buffer_size = 2  # batches each worker prepares ahead
    config.read_threads = 2  # decoding threads in each process
    # Linux: this many of the host's CPUs (the last ones this process may use) run only the
    # decoding processes, the training process (XLA's threads too) the rest: on CPU, sharing
    # cores stalls XLA's threads (docs/data.md). 0, or worker_count = 0, shares all CPUs.
    config.dedicated_worker_cpus = 0
    # Past this fraction of unusable samples (or of malformed lines) the job stops with DataError;
    # each decoding process judges the samples it has prepared, after the first few.
    config.max_bad_fraction = 0.05
    config.min_samples_before_bad_check = 100
    config.skip_malformed_lines = False  # False: a malformed line is an error naming file:line
    return config


@dataclasses.dataclass
class _Failure:
    """Stands in for a sample that could not be prepared; dropped and counted downstream."""

    counter: str
    reason: str
    index: int  # in the global stream


@dataclasses.dataclass
class _PrepareSample:
    """Decodes and builds one Sample; a _Failure if it cannot.

    Unpacked (`modality_rows` None or packing off): padded to the config's fixed text length.
    For packing: unpadded, a still image's one frame kept alone, the text cut to what fits a
    row beside the sample's modality rows (and to max_text_length). Both carry the sample's
    `work` (packing.WORK) when `modality_rows` is given."""

    config: ml_collections.ConfigDict
    tokenizer: object
    modality_rows: packing.ModalityRows | None = None
    cache: feature_cache.FeatureCache | None = None

    def __call__(self, index: int, sample: conversation.Sample) -> dict | _Failure:
        """`index`: the sample's place in the whole job's stream, so that its random crops do
        not depend on how many processes read the stream."""
        config, rows = self.config, self.modality_rows
        packed = config.packing.enabled
        rng = np.random.default_rng((config.shuffle_seed, index))
        try:
            media = None
            if sample.modality is not None:
                assert sample.media_path is not None  # parse_sample gives a modality only with a media path
                media = load_sample_media(sample.media_path, config, self.cache)
            max_length = config.max_text_length
            if packed:
                assert rows is not None  # make_train_iterator's packing.budget_of checked them
                used, _ = routed_modality(sample.modality, media)
                max_length = min(max_length, config.packing.row_length - rows.count(used) + (used is not None))
            built = build_sample(
                sample.turns, media, sample.modality, config, self.tokenizer, rng=rng, max_length=max_length
            )
        except MediaError as e:
            return _Failure("num_skipped_media", f"{sample.origin}: {e}", index)
        except conversation.PromptTooLongError as e:
            return _Failure("num_skipped_text", f"{sample.origin}: {e}", index)
        built.update({counter: np.int32(0) for counter in _SKIP_COUNTERS})
        built[position.CONSUMED] = str(index)
        if rows is not None:
            num_frames = (
                (1 if media.is_still else config.num_frames) if media is not None and built["has_visual"] else 0
            )
            # A still's one frame, as a pack holds it.
            unpadded = dict(
                built,
                **{name: built[name][:num_frames] for name in packing.FRAME_ARRAYS if name in built},
                modality_token_at=np.int32(conversation.modality_token_position(built["input_ids"], self.tokenizer)),
            )
            if packed:
                return dict(unpadded, sample_index=np.int64(index))  # the packer's checkpoint names samples by it
            built["work"] = packing.sample_work(packing.footprint(unpadded, rows), rows)
        return pad_text(built, config.max_text_length, self.tokenizer)


class _SkipBadSamples(grain.IterDataset):
    """Drops _Failure elements, adding their counts to the next good sample's counters.

    Keeps running totals (in the iterator state, so they survive a restart) and raises
    DataError, listing the first failures, once more than `max_bad_fraction` of the samples
    seen are bad. With worker processes each worker checks the samples it prepares.
    """

    def __init__(self, parent, max_bad_fraction, min_samples):
        super().__init__(parent)
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples

    def __iter__(self):
        return _SkipBadSamplesIterator(self._parent.__iter__(), self.max_bad_fraction, self.min_samples)


class _SkipBadSamplesIterator(grain.DatasetIterator):
    def __init__(self, parent, max_bad_fraction, min_samples):
        super().__init__(parent)
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples
        self.pending = dict.fromkeys(_SKIP_COUNTERS, 0)  # failures since the last good sample
        self.pending_reasons: list[str] = []
        self.pending_indices: list[str] = []
        self.num_good, self.num_bad = 0, 0
        self.first_failures: list[str] = []

    def __next__(self):
        while isinstance(element := next(self._parent), _Failure):
            self.pending[element.counter] += 1
            self.pending_reasons.append(element.reason)
            self.pending_indices.append(str(element.index))
            self.num_bad += 1
            if len(self.first_failures) < _MAX_LISTED_FAILURES:
                self.first_failures.append(element.reason)
            self._check()
        self.num_good += 1
        self._check()
        element.update({k: np.int32(v) for k, v in self.pending.items()})
        element["skipped_reasons"] = np.array("\n".join(self.pending_reasons))
        element[position.CONSUMED] = np.array(" ".join([*self.pending_indices, element[position.CONSUMED]]))
        self.pending, self.pending_reasons, self.pending_indices = dict.fromkeys(_SKIP_COUNTERS, 0), [], []
        return element

    def _check(self):
        seen = self.num_good + self.num_bad
        if seen >= self.min_samples and self.num_bad > self.max_bad_fraction * seen:
            listed = "\n  ".join(self.first_failures)
            raise DataError(
                f"{self.num_bad} of {seen} samples could not be used (more than max_bad_fraction="
                f"{self.max_bad_fraction}); first failures:\n  {listed}"
            )

    def get_state(self):
        return {
            "parent": self._parent.get_state(),
            "pending": dict(self.pending),
            "pending_reasons": list(self.pending_reasons),
            "pending_indices": list(self.pending_indices),
            "num_good": self.num_good,
            "num_bad": self.num_bad,
            "first_failures": list(self.first_failures),
        }

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.pending, self.num_good, self.num_bad = dict(state["pending"]), state["num_good"], state["num_bad"]
        self.first_failures = list(state["first_failures"])
        self.pending_reasons = list(state.get("pending_reasons", []))
        self.pending_indices = list(state.get("pending_indices", []))


def read_sources(data_config) -> list[list[conversation.Sample]]:
    """The samples of every source; malformed lines raise, or are skipped, reported and counted."""
    if not data_config.sources or not all(s.get("path") for s in data_config.sources):
        raise ValueError("data.sources must list at least one {path, media_root, weight}")
    per_source, malformed, total = [], [], 0
    for i, source in enumerate(data_config.sources):
        if not os.path.isfile(source["path"]):
            raise DataError(f"data.sources[{i}].path: {source['path']} is no instruction file (no such file)")
        samples, bad = conversation.read_samples(
            source["path"], source.get("media_root"), skip_malformed=data_config.skip_malformed_lines
        )
        if not samples:
            raise ValueError(f"{source['path']}: no usable samples")
        per_source.append(samples)
        malformed += bad
        total += len(samples) + len(bad)
    if malformed:
        listed = "\n  ".join(str(e) for e in malformed[:_MAX_LISTED_FAILURES])
        message = f"skipped {len(malformed)} malformed lines of {total}:\n  {listed}"
        if len(malformed) > data_config.max_bad_fraction * total:
            raise DataError(message + f"\nthat is more than max_bad_fraction={data_config.max_bad_fraction}")
        logger.warning(message)
    return per_source


def make_train_iterator(
    data_config,
    tokenizer,
    *,
    global_batch_size,
    process_index=None,
    process_count=None,
    worker_cpus=None,
    per_source=None,
    modality_rows: packing.ModalityRows | None = None,
    cache: feature_cache.FeatureCache | None = None,
):
    """This host's batches: a position.StreamIterator (checkpoint it with grain.checkpoint.CheckpointSave).

    `per_source`: the sources' samples when the caller has read them (`read_sources`).
    `modality_rows`: the model's rows per modality; needed for packing, and to give unpacked
    batches their `work` (packing.WORK) for the FLOP counts.

    `cache`: the opened data_config.feature_cache, when the caller has it (opened here otherwise).

    `worker_cpus`: the CPUs the decoding processes are pinned to (see `runtime.split_cpus`); None
    leaves them where the scheduler puts them.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
    missing = [t for t in MODALITY_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"the tokenizer lacks the modality tokens {missing}; see conversation.add_modality_tokens")
    if packed := data_config.packing.enabled:
        packing.budget_of(data_config, modality_rows)  # a bad budget is an error now, not in a worker
    if data_config.feature_cache and cache is None:
        cache = feature_cache.FeatureCache(data_config.feature_cache)

    datasets = []
    for index, samples in enumerate(per_source if per_source is not None else read_sources(data_config)):
        dataset = grain.MapDataset.source(samples)
        dataset = dataset.shuffle(seed=data_config.shuffle_seed + index).repeat(data_config.source_epochs)
        datasets.append(dataset)
    weights = [float(s.get("weight", 1.0)) for s in data_config.sources]
    dataset = grain.MapDataset.mix(datasets, weights) if len(datasets) > 1 else datasets[0]
    batch_size = global_batch_size // process_count
    # Lazy: runs on this host's samples only (the index: the sample's in the global stream).
    dataset = dataset.map_with_index(_PrepareSample(data_config, tokenizer, modality_rows, cache))
    # Packed: every process-count-th sample is this host's, and it packs its own; unpacked: its
    # run of samples in each global batch.
    layout = position.Layout(process_count, process_index, 1 if packed else batch_size, data_config.worker_count)

    def build(view: position.View):
        part = position.HostPart(position.ViewDataset(dataset, view), layout)
        return _host_batches(part, data_config, tokenizer, modality_rows, batch_size, worker_cpus)

    return position.StreamIterator(build, layout)


def _host_batches(dataset, data_config, tokenizer, modality_rows, batch_size, worker_cpus):
    """A grain iterator over the batches of this process's prepared samples `dataset`."""
    # Threads within each process overlap file reads with decoding; keep the read-ahead to
    # about a batch so that memory stays bounded with many workers.
    read_options = grain.ReadOptions(num_threads=data_config.read_threads, prefetch_buffer_size=batch_size)
    iterable = _SkipBadSamples(
        dataset.to_iter_dataset(read_options), data_config.max_bad_fraction, data_config.min_samples_before_bad_check
    )
    if data_config.packing.enabled:
        budget = packing.budget_of(data_config, modality_rows)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        assert modality_rows is not None  # packing.budget_of checked them
        iterable = packer.PackSamples(
            iterable, budget, modality_rows, pad_id, media_shapes(data_config), COUNTERS, data_config.packing.window
        )
    iterable = iterable.batch(batch_size, drop_remainder=True)
    if data_config.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_config.worker_count, per_worker_buffer_size=data_config.worker_buffer_size
            ),
            worker_init_fn=functools.partial(_init_worker, cpus=worker_cpus),
        )
    return iter(iterable)


def _init_worker(worker_index: int, worker_count: int, *, cpus: set[int] | None) -> None:
    """Runs numpy's BLAS on one thread in a decoding process, on `cpus` if given, and leaves
    Ctrl-C to the trainer.

    The workers are the parallelism; a multi-threaded BLAS that competes with the training
    step for the same cores spins instead of working (the demo's CLAP log-mel took 48 ms
    instead of 2 ms on 2 cores). A terminal's Ctrl-C reaches the whole process group: a worker
    killed by it mid-batch leaks the batch's shared memory; the trainer stops them instead."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threadpoolctl.threadpool_limits(1)
    if cpus:
        runtime.pin_process(cpus)


def iterate_eval(path: str | os.PathLike, data_config, media_root=None):
    """Yields (Sample, Media, or CachedMedia with data_config.feature_cache, or None for
    text-only) for every line of an evaluation file, in order.

    No shuffling, no re-routing: a file that cannot be decoded raises MediaError.
    """
    samples, _ = conversation.read_samples(path, media_root)
    cache = feature_cache.FeatureCache(data_config.feature_cache) if data_config.feature_cache else None
    for sample in samples:
        yield (
            sample,
            (load_sample_media(sample.media_path, data_config, cache) if sample.media_path is not None else None),
        )
