"""The frozen-encoder feature cache: what the projectors read of each media file, computed once.

The encoders never train, so their outputs for a file are the same every epoch. The cache
(built by `tools/cache_features.py`, avllm_jax/cache_features.py) keeps, per media file:

    frame_cls        [T, Dv] (a still image: [1, Dv])  each sampled frame's CLS token
    item_patches     [N, Dv]                           the patch tokens averaged over the frames
    audio_embeddings [K, Da]                           each audio segment's embedding

(the arrays of a stream the file lacks are absent), in bfloat16 unless built otherwise. Training
with `data.feature_cache=DIR` reads its samples from the same JSONL files as ever, and takes
each sample's features from here instead of decoding and encoding its file: the mixture,
shuffling, host sharding, packing, skip counting and resume are the media path's own.

A directory holds `manifest.json` (the fingerprint of everything the features depend on, and
the arrays' shapes) and, for each of its num_shards shards, `shard-IIIII-of-NNNNN.array_record`
(one record per file) with `shard-IIIII-of-NNNNN.json` (the files in record order and those
skipped with their reasons; written last, so it marks the shard finished). Files are keyed by
their path as the data sources resolve it, so a cache serves the sources it was built from
and any others that name the same files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from avllm_jax.data.media import MediaError
from avllm_jax.errors import AvllmError

MANIFEST = "manifest.json"
# The data fields the features depend on (the text fields do not matter to them).
MEDIA_FIELDS = (
    "num_frames",
    "image_size",
    "num_audio_segments",
    "audio_front_end",
    "audio_sample_rate",
    "audio_max_length_s",
    "audio_truncation",
    "audio_padding",
    "whisper_mel_bins",
)
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


class FeatureCacheError(AvllmError, ValueError):
    """A cache that cannot serve this run: not built, unfinished, or of other features."""


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def media_key(path: str | os.PathLike) -> str:
    return os.path.normpath(os.fspath(path))


# -- the fingerprint -------------------------------------------------------------------------


def fingerprint(data_config, encoder_configs: dict[str, dict], encoder_digests: dict[str, str]) -> dict:
    """Everything the cached features depend on, as flat {field: value}: the data config's
    media fields, each encoder's config (by part name) and a digest of its weights
    (`models.avllm.AVLLM.encoder_identity` gives both)."""
    out = {f"data.{name}": data_config[name] for name in MEDIA_FIELDS}
    for part, fields in sorted(encoder_configs.items()):
        out |= {
            f"model.{part}.{name}": list(value) if isinstance(value, tuple) else value for name, value in fields.items()
        }
    out |= {f"weights.{part}": digest for part, digest in sorted(encoder_digests.items())}
    return out


def fingerprint_problem(cached: dict, current: dict) -> str | None:
    """Which fields differ between a cache's fingerprint and a run's, or None."""
    differ = [name for name in sorted(cached.keys() | current.keys()) if cached.get(name) != current.get(name)]
    if not differ:
        return None
    shown = ", ".join(
        f"{name} (cache {cached.get(name, 'absent')!r}, run {current.get(name, 'absent')!r})" for name in differ[:4]
    )
    more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
    return f"the cache's features were computed with other settings: {shown}{more}"


# -- records ---------------------------------------------------------------------------------


def encode_record(path: str, has_visual: bool, has_audio: bool, arrays: dict[str, np.ndarray]) -> bytes:
    """One file's record: a JSON header (path, streams, each array's dtype and shape) then the arrays' bytes."""
    header = dict(
        path=path,
        has_visual=has_visual,
        has_audio=has_audio,
        arrays={name: [str(a.dtype), list(a.shape)] for name, a in arrays.items()},
    )
    head = json.dumps(header).encode()
    return len(head).to_bytes(4, "little") + head + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())


def decode_record(record: bytes) -> CachedMedia:
    size = int.from_bytes(record[:4], "little")
    header = json.loads(record[4 : 4 + size])
    offset, arrays = 4 + size, {}
    for name, (dtype, shape) in header["arrays"].items():
        dtype = np.dtype(DTYPES.get(dtype, dtype))
        count = int(np.prod(shape))
        arrays[name] = np.frombuffer(record, dtype, count, offset).reshape(shape)
        offset += count * dtype.itemsize
    return CachedMedia(header["path"], header["has_visual"], header["has_audio"], arrays)


@dataclasses.dataclass
class CachedMedia:
    """A file's cached features; stands where decoded `Media` stands in samples.build_sample."""

    path: str
    has_visual: bool
    has_audio: bool
    arrays: dict[str, np.ndarray]

    @property
    def is_still(self) -> bool:
        return self.has_visual and self.arrays["frame_cls"].shape[0] == 1


# -- reading ---------------------------------------------------------------------------------


class FeatureCache:
    """A finished cache directory: looks files up by path. Picklable (grain's worker processes
    get a copy), each process opening the shards for itself."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.manifest = read_manifest(self.directory)
        count = self.manifest["num_shards"]
        names = [shard_name(i, count) for i in range(count)]
        unfinished = [name for name in names if not os.path.exists(os.path.join(self.directory, name + ".json"))]
        if unfinished:
            raise FeatureCacheError(
                f"{self.directory}: {len(unfinished)} of {count} shards are not finished ({', '.join(unfinished[:3])}"
                f"{', ...' if len(unfinished) > 3 else ''}); run tools/cache_features.py for them (--shard=I/{count})"
            )
        self.record_files = [os.path.join(self.directory, name + ".array_record") for name in names]
        self.index: dict[str, int] = {}  # media key -> record number over all shards in order
        self.skipped: dict[str, str] = {}  # media key -> why it could not be cached
        for name in names:
            with open(os.path.join(self.directory, name + ".json")) as f:
                shard = json.load(f)
            for path in shard["paths"]:
                self.index[path] = len(self.index)
            self.skipped |= shard["skipped"]
        self._source: Sequence[bytes] | None = None  # grain's ArrayRecordDataSource, opened at the first lookup

    @property
    def fingerprint(self) -> dict:
        return self.manifest["fingerprint"]

    def check(self, current_fingerprint: dict, *, weights: bool = True) -> None:
        """FeatureCacheError naming the fields the run's fingerprint differs in; `weights` False
        leaves the weight digests out (before the weights are loaded)."""
        cached = (
            self.fingerprint if weights else {k: v for k, v in self.fingerprint.items() if not k.startswith("weights.")}
        )
        if problem := fingerprint_problem(cached, current_fingerprint):
            raise FeatureCacheError(
                f"{self.directory}: {problem}; rebuild the cache for this config, or use the config it was built for"
            )

    def missing(self, paths) -> list[str]:
        """Those of `paths` the cache neither holds nor skipped: it was built from other sources."""
        return [p for p in paths if media_key(p) not in self.index and media_key(p) not in self.skipped]

    def lookup(self, path: str | os.PathLike) -> CachedMedia:
        """The file's features; MediaError (as decoding it would raise) when it was skipped, or is not in the cache."""
        key = media_key(path)
        if key in self.skipped:
            raise MediaError(f"{path}: {self.skipped[key]} (found when the feature cache was built)")
        if key not in self.index:
            raise MediaError(f"{path}: not in the feature cache {self.directory}")
        if self._source is None:
            from grain.sources import ArrayRecordDataSource

            self._source = ArrayRecordDataSource(self.record_files)
        return decode_record(self._source[self.index[key]])

    def __getstate__(self):
        return {**self.__dict__, "_source": None}


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FeatureCacheError(
            f"{directory}: no feature cache here (no {MANIFEST}); build it with tools/cache_features.py"
        )
    with open(path) as f:
        return json.load(f)


@functools.lru_cache(maxsize=8)
def read_shapes(directory: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each cached feature's shape per frame (frame_cls: one frame's), item or clip, and its
    dtype, from the cache's manifest (read once per process)."""
    manifest = read_manifest(directory)
    dtype = np.dtype(DTYPES[manifest["dtype"]])
    return {name: (tuple(shape), dtype) for name, shape in manifest["shapes"].items()}
