"""Build a frozen-encoder feature cache: `python -m avllm_jax.cache_features --config=FILE --out=DIR [--shard=I/N]`
(or `python tools/cache_features.py`, the same command).

Runs the config's frozen encoders (its init_checkpoint's, or its seed's random ones) once over
every media file its data sources name, with its media settings, and writes what the
projectors read of each file (data/feature_cache.py) into DIR. Train from it with
`--config.data.feature_cache=DIR`.

- Shards: the files are split into N contiguous shards; each process builds the shard it is
  given (`--shard=I/N`: a SLURM array, one per TPU host), or, without --shard, the shard of its
  index in a multi-process job ($AVLLM_PROCESS_ID of $AVLLM_NUM_PROCESSES), else all of them.
- Resume: a finished shard is kept; an interrupted one is built again from its start.
- Bad media (a file that cannot be decoded, or has no stream) are skipped as training skips
  them, listed with their reasons in DIR/skipped.txt, and counted; training counts a sample
  whose file was skipped as num_skipped_media, as if it had failed to decode.
- Every local device encodes: a batch of files is split over them, the weights over them too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time

import grain
import jax
import ml_collections
import numpy as np
from flax import nnx

from avllm_jax import cli, runtime
from avllm_jax.data import feature_cache, pipeline, samples
from avllm_jax.data.media import MediaError
from avllm_jax.errors import AvllmError
from avllm_jax.models import layers
from avllm_jax.training import config as config_lib
from avllm_jax.training import sharding

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser("python -m avllm_jax.cache_features", __doc__)
    parser.add_config_flag(
        "training config file (configs/*.py) whose data and encoders to cache", config_lib.unknown_field
    )
    parser.add_argument("--out", required=True, help="cache directory (created)")
    parser.add_argument(
        "--shard", default=None, help="I/N: build shard I (from 0) of N; default: this process's of the job's, or 0/1"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="files encoded per forward pass, over all local devices"
    )
    parser.add_argument(
        "--dtype", default="bfloat16", choices=list(feature_cache.DTYPES), help="dtype the features are stored in"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: config.data.worker_count)"
    )
    return parser.parse_args(argv)


class CacheBuildError(AvllmError, RuntimeError):
    """The cache cannot be built as asked: the message says why."""


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N); None -> this process's place in a multi-process job, or (0, 1)."""
    if text is None:
        settings = runtime.settings()
        return (
            (settings["process_id"] or 0, settings["num_processes"] or 1) if settings.get("num_processes") else (0, 1)
        )
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise CacheBuildError(f"--shard={text!r}: expected I/N, e.g. --shard=0/8") from None
    if not 0 <= index < count:
        raise CacheBuildError(f"--shard={text!r}: I must be in 0 .. N-1")
    return index, count


def media_files(data_config) -> list[str]:
    """The media files of the data sources, each once, in the order they first appear."""
    keys: dict[str, None] = {}  # an ordered set
    for source in pipeline.read_sources(data_config):
        for sample in source:
            if sample.media_path is not None:
                keys.setdefault(feature_cache.media_key(sample.media_path), None)
    return list(keys)


def shard_files(files: list[str], index: int, count: int) -> list[str]:
    return files[len(files) * index // count : len(files) * (index + 1) // count]


@dataclasses.dataclass
class _DecodeFile:
    """One file -> the encoders' inputs (all the streams it has), or the reason it cannot be used."""

    config: ml_collections.ConfigDict  # the data config, without a feature cache
    first_file: int  # the shard's first file's index over all shards

    def __call__(self, index: int, path: str) -> dict:
        index += self.first_file
        try:
            media = samples.load_file_media(path, self.config)
            if not (media.has_visual or media.has_audio):
                raise MediaError(f"{path}: the file has no video or audio stream to use")
        except MediaError as error:
            return dict(index=np.int64(index), error=np.array(str(error)))
        # Its own seed for the audio crop, whichever shard or worker decodes it.
        arrays = samples.media_arrays(media, self.config, rng=np.random.default_rng((self.config.shuffle_seed, index)))
        return dict(arrays, index=np.int64(index), is_still=np.bool_(media.is_still), error=np.array(""))


def _pack_layout(batch: dict, num_frames: int) -> dict:
    """A batch of files as packs of one video and one clip each, as the encoders take them."""
    size = batch["has_visual"].shape[0]
    packs = {
        "frames": batch["frames"],
        "frame_item": np.zeros((size, num_frames), np.int32),
        "item_frames": np.full((size, 1), num_frames, np.int32),
    }
    for name in ("audio_features", "audio_is_longer", "audio_valid_frames"):
        if name in batch:
            packs[name] = batch[name][:, None]
    return packs


def build(
    config,
    out_dir: str,
    shard: tuple[int, int],
    *,
    batch_size: int = 32,
    dtype: str = "bfloat16",
    workers: int | None = None,
) -> dict:
    """Builds one shard of the cache of `config` in `out_dir`; returns its counts
    {files, cached, skipped} (files 0 when the shard was finished already)."""
    from avllm_jax import train

    config_lib.check_config(config)
    if config.data.feature_cache:
        raise CacheBuildError(
            "config.data.feature_cache is set: a cache is built from media files, not from another cache"
        )
    data_config = config.data
    model_config, _, init_dir = train.resolve_model(config)
    train.check_data_matches_model(data_config, model_config)
    if not (model_config.vision or model_config.audio):
        raise CacheBuildError("the config's model has no encoder to cache")
    index, count = shard
    name = feature_cache.shard_name(index, count)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, name + ".json")):
        logger.info(f"{out_dir}: {name} is finished already; nothing to do")
        return dict(files=0, cached=0, skipped=0)
    try:  # a missing or malformed source stops the build here, before any weights load
        all_files = media_files(data_config)
    except (ValueError, OSError, pipeline.DataError) as error:
        raise CacheBuildError(str(error)) from error
    files = shard_files(all_files, index, count)
    first_file = len(all_files) * index // count  # a file's index over all shards seeds its audio crop

    devices = jax.local_devices()
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=devices)
    batch_size = -(-batch_size // len(devices)) * len(devices)  # whole per-device batches
    with jax.set_mesh(mesh):
        model = sharding.create_sharded_model(model_config, init_dir, mesh, config.init_seed)
        _write_manifest(
            out_dir,
            feature_cache.fingerprint(data_config, *model.encoder_identity()),
            count,
            dtype,
            _feature_shapes(model_config, data_config),
        )
        encode = _encoder(model, mesh, feature_cache.DTYPES[dtype])

        records_path = os.path.join(out_dir, name + ".array_record")
        decoded = grain.MapDataset.source(files).map_with_index(_DecodeFile(data_config, first_file)).to_iter_dataset()
        num_workers = data_config.worker_count if workers is None else workers
        if num_workers > 0:
            decoded = decoded.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        iterator = iter(decoded)
        try:
            cached, skipped = _write_records(
                iterator, files, first_file, encode, batch_size, data_config.num_frames, records_path + ".partial", name
            )
        finally:
            if hasattr(iterator, "close"):  # stops the decoding processes and frees their shared memory
                iterator.close()
    os.replace(records_path + ".partial", records_path)
    _atomic_write(os.path.join(out_dir, name + ".json"), json.dumps(dict(paths=cached, skipped=skipped)))
    _write_report(out_dir, count)
    logger.info(
        f"{name}: cached {len(cached)} of {len(files)} files, skipped {len(skipped)} (listed in {out_dir}/skipped.txt)"
    )
    return dict(files=len(files), cached=len(cached), skipped=len(skipped))


def _write_records(
    decoded, files, first_file, encode, batch_size, num_frames, path, name
) -> tuple[list[str], dict[str, str]]:
    """Encodes the decoded files in batches and writes one record each to `path`; returns the
    cached files in record order and the skipped ones with their reasons."""
    import tqdm
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")  # one record per chunk: fast random reads
    cached, skipped, pending = [], {}, []
    with tqdm.tqdm(total=len(files), desc=f"caching {name}", unit="clip", file=sys.stdout) as progress:
        for element in decoded:
            file = files[int(element["index"]) - first_file]
            if str(element["error"]):
                skipped[file] = str(element["error"]).removeprefix(f"{file}: ")
                progress.update(1)
                continue
            pending.append((file, element))
            if len(pending) == batch_size:
                cached += _encode_and_write(encode, pending, batch_size, num_frames, writer)
                progress.update(len(pending))
                pending = []
        if pending:
            cached += _encode_and_write(encode, pending, batch_size, num_frames, writer)
            progress.update(len(pending))
    writer.close()
    return cached, skipped


def _encoder(model, mesh, dtype):
    """batch of packs -> the encoders' outputs in `dtype`, the batch split over the mesh."""
    graphdef, state = nnx.split(model)
    return lambda packs: _encode(graphdef, state, sharding.shard_batch(packs, mesh), np.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 3))  # at module level: builds in one process share its compiles
def _encode(graphdef, state, packs, dtype):
    with layers.activation_sharding(sharding.activation_spec):
        outputs = nnx.merge(graphdef, state).encoder_outputs(packs)
    return {name: value.astype(dtype) for name, value in outputs.items()}


def _encode_and_write(encode, pending: list, batch_size: int, num_frames: int, writer) -> list[str]:
    elements = [element for _, element in pending]
    elements += [elements[-1]] * (batch_size - len(elements))  # one static shape: the last batch is padded
    batch = {
        key: np.stack([e[key] for e in elements]) for key in elements[0] if key not in ("index", "error", "is_still")
    }
    outputs = jax.device_get(encode(_pack_layout(batch, num_frames)))
    for row, (path, element) in enumerate(pending):
        arrays = {}
        if element["has_visual"] and "frame_cls" in outputs:
            frame_cls = outputs["frame_cls"][row]
            arrays["frame_cls"] = frame_cls[:1] if element["is_still"] else frame_cls  # a still's T frames are one
            arrays["item_patches"] = outputs["item_patches"][row, 0]
        if element["has_audio"] and "audio_embeddings" in outputs:
            arrays["audio_embeddings"] = outputs["audio_embeddings"][row, 0]
        writer.write(feature_cache.encode_record(path, bool(element["has_visual"]), bool(element["has_audio"]), arrays))
    return [path for path, _ in pending]


def _feature_shapes(model_config, data_config) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    if model_config.vision:
        width = model_config.vision.hidden_size
        shapes |= dict(frame_cls=[width], item_patches=[model_config.vision.num_patches, width])
    if model_config.audio:
        shapes["audio_embeddings"] = [data_config.num_audio_segments, model_config.audio.num_features]
    return shapes


def _write_manifest(out_dir: str, fingerprint: dict, num_shards: int, dtype: str, shapes: dict) -> None:
    """Writes the manifest, or checks that the one there (another shard's) describes this build."""
    manifest = dict(fingerprint=fingerprint, num_shards=num_shards, dtype=dtype, shapes=shapes)
    path = os.path.join(out_dir, feature_cache.MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        if problem := feature_cache.fingerprint_problem(existing["fingerprint"], fingerprint):
            raise CacheBuildError(f"{out_dir} holds a cache built otherwise: {problem}; use another --out")
        for field in ("num_shards", "dtype"):
            if existing[field] != manifest[field]:
                raise CacheBuildError(
                    f"{out_dir} holds a cache of {field}={existing[field]!r}, not {manifest[field]!r}; use another "
                    "--out"
                )
        return
    _atomic_write(path, json.dumps(manifest, indent=1))


def _write_report(out_dir: str, num_shards: int) -> None:
    """skipped.txt: every skipped file of the finished shards, with its reason."""
    lines, done = [], 0
    for index in range(num_shards):
        path = os.path.join(out_dir, feature_cache.shard_name(index, num_shards) + ".json")
        if os.path.exists(path):
            done += 1
            with open(path) as f:
                lines += [f"{file}: {reason}" for file, reason in json.load(f)["skipped"].items()]
    header = f"{len(lines)} files skipped in {done} of {num_shards} finished shards"
    _atomic_write(os.path.join(out_dir, "skipped.txt"), "\n".join([header, *lines]) + "\n")


def _atomic_write(path: str, text: str) -> None:
    with open(path + ".partial", "w") as f:
        f.write(text)
    os.replace(path + ".partial", path)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.configure_logging(args, stream="stdout")  # the build's progress is its output
    shard = parse_shard(args.shard)  # inside: a bad $AVLLM_PROCESS_ID is a DistributedError
    start = time.time()
    counts = build(args.config, args.out, shard, batch_size=args.batch_size, dtype=args.dtype, workers=args.workers)
    if counts["files"]:
        logger.info(f"{counts['files'] / (time.time() - start):.1f} files/s overall")


if __name__ == "__main__":
    main()
