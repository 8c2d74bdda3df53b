"""Train the audio-visual LLM: `python -m avllm_jax.train --config=configs/sft.py --workdir=DIR`.

The config file is the whole record of the run (see configs/). Rerunning the same command on
the same workdir resumes from its latest checkpoint: parameters, optimizer state, step and
the data iterator's position, so the run continues exactly where it stopped.

On several hosts, the same command runs on each (see avllm_jax/runtime.py for how the
processes find each other). On SIGTERM (preemption) the run saves at the end of its current
step, on every host at the same step, and exits with status 143.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile

import jax
from flax import nnx

from avllm_jax import checkpoint, cli, errors, runtime
from avllm_jax.data import conversation, feature_cache, features, packer, packing, phases, pipeline
from avllm_jax.errors import AvllmError
from avllm_jax.models import avllm
from avllm_jax.training import config as config_lib
from avllm_jax.training import goodput, loop, optim, sharding

PREEMPTED_EXIT_STATUS = errors.EXIT_PREEMPTED  # what a process ended by SIGTERM returns: the job did not finish
logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser("python -m avllm_jax.train", __doc__)
    parser.add_config_flag("training config file (configs/*.py)", config_lib.unknown_field)
    parser.add_argument("--workdir", required=True, help="directory for checkpoints, logs and the model config")
    parser.add_argument(
        "--allow-new-schedule",
        action="store_true",
        help="resume a checkpoint whose num_steps or optim settings differ from the config's, under the config's",
    )
    parser.add_argument(
        "--step-timeout-s",
        type=float,
        default=1800,
        help="a step (the compiling first one apart) that takes longer is a hang: every thread's stack is written to "
        "WORKDIR/hang_process_<i>.txt and the process exits (0: no limit); SIGUSR1 writes the same dump at any time",
    )
    cli.add_distributed_flags(parser)
    return parser.parse_args(argv)


class SetupError(AvllmError, RuntimeError):
    """A run that cannot start (missing checkpoint, bad config): the message says what to do."""


def resolve_model(config):
    """(model config, tokenizer, directory to load weights from or None) for a run.

    `config.model.parts` names the parts; the fields set in `config.model.<part>` override
    (see avllm_jax/training/config.py), and those set for a part it does not name are printed
    as unused. With `init_checkpoint`, each part is the one stored there (a converted
    checkpoint, or the workdir of an earlier stage), which must hold exactly the named parts,
    its audio encoder of `config.model.audio_kind`.
    Without it, each named part is its config dataclass's defaults plus the overrides, with
    random weights and the tokenizer from `config.tokenizer` (the demo does this).
    """
    overrides = {}
    for part, fields in config_lib.model_overrides(config).items():
        if part in config.model.parts:
            overrides[part] = fields
        elif fields:
            logger.warning(
                f"config.model.{part} sets {', '.join(sorted(fields))}: unused, as config.model.parts does not name "
                f"{part!r}"
            )
    if config.init_checkpoint:
        if not os.path.exists(os.path.join(config.init_checkpoint, checkpoint.CONFIG_FILE)):
            raise SetupError(
                f"init_checkpoint {config.init_checkpoint!r} does not exist or holds no model.\n{_MAKE_INIT_CHECKPOINT}"
            )
        stored = checkpoint.read_model_config(config.init_checkpoint)
        stored_parts = tuple(part for part in avllm.PARTS if getattr(stored, part))
        if set(stored_parts) != set(config.model.parts):
            raise SetupError(
                f"config.model.parts={tuple(config.model.parts)!r} but init_checkpoint {config.init_checkpoint!r} "
                f'holds {stored_parts!r}: name exactly the parts it holds, e.g. --config.model.parts="{stored_parts!r}"'
            )
        if stored.audio and stored.audio.kind != config.model.audio_kind:
            raise SetupError(
                f"config.model.audio_kind={config.model.audio_kind!r} but init_checkpoint {config.init_checkpoint!r} "
                f"holds a {stored.audio.kind!r} audio encoder: use --config.model.audio_kind={stored.audio.kind}"
            )
        model_config = stored.replace(**overrides)
        _check_same_weight_shapes(stored, model_config, overrides)
        return model_config, conversation.load_tokenizer(config.init_checkpoint), config.init_checkpoint
    if not config.tokenizer:
        raise SetupError(
            "set config.init_checkpoint (a converted checkpoint) or config.tokenizer (to train from scratch)"
        )
    tokenizer = conversation.pretrained_tokenizer(config.tokenizer, "config.tokenizer")
    token_ids = tuple(conversation.add_modality_tokens(tokenizer))
    vocab_size = overrides["llm"].setdefault("vocab_size", len(tokenizer))
    if vocab_size != len(tokenizer):
        raise SetupError(
            f"config.model.llm.vocab_size={vocab_size} but the tokenizer {config.tokenizer!r} has {len(tokenizer)} "
            "tokens; without init_checkpoint leave it unset (it is the tokenizer's size)"
        )
    parts = {part: config_lib.part_config(config, part, fields) for part, fields in overrides.items()}
    return avllm.AVLLMConfig(**parts, modality_token_ids=token_ids), tokenizer, None


def _check_same_weight_shapes(stored, model_config, overrides):
    # Restoring does not check shapes: weights of another shape would load under a config
    # that does not describe them.
    before, after = _weight_shapes(stored), _weight_shapes(model_config)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if changed:
        fields = ", ".join(f"model.{part}.{k}" for part, set_fields in overrides.items() for k in sorted(set_fields))
        raise SetupError(
            f"with init_checkpoint, the overrides ({fields}) change the shapes of its weights, e.g. {changed[0]} "
            f"{before.get(changed[0])} -> {after.get(changed[0])}; only fields that keep them (dtype, remat_policy, "
            "attention_implementation) can change"
        )


def _weight_shapes(model_config) -> dict[str, tuple]:
    _, state = checkpoint.abstract_model(model_config)
    return {optim.path_name(path): variable.get_value().shape for path, variable in nnx.to_flat_state(state)}


_MAKE_INIT_CHECKPOINT = (
    "It is either a converted checkpoint, made by tools/convert_hf_weights.py --out DIR (README, "
    "'Converting weights'; configs/pretrain.py starts from one), or the workdir of an earlier stage "
    "(configs/sft.py starts from the workdir of configs/pretrain.py: run that stage first). Each config "
    "file's docstring shows its commands; point --config.init_checkpoint at the directory."
)


def check_data_matches_model(data_config, model_config):
    if model_config.vision and data_config.image_size != model_config.vision.image_size:
        raise SetupError(
            f"data.image_size={data_config.image_size} but the vision encoder takes {model_config.vision.image_size} px"
        )
    if model_config.audio and (problem := features.audio_settings_problem(data_config, model_config.audio)):
        raise SetupError(f"data.{problem}")


def _open_feature_cache(data_config, per_source, model_config) -> feature_cache.FeatureCache:
    """The run's feature cache, which must be of its media settings and encoder configs (its
    weights are checked once loaded) and hold (or have skipped) every file of the sources."""
    cache = feature_cache.FeatureCache(data_config.feature_cache)
    cache.check(feature_cache.fingerprint(data_config, model_config.encoder_configs(), {}), weights=False)
    missing = cache.missing(s.media_path for samples in per_source for s in samples if s.media_path is not None)
    if missing:
        raise SetupError(
            f"{len(missing)} media files of the data sources are not in the feature cache {cache.directory}, e.g. "
            f"{', '.join(missing[:3])}: it was built from other sources; build it from this config's "
            "(tools/cache_features.py --config=...)"
        )
    return cache


def total_steps(config, per_source, tokenizer, modality_rows) -> int:
    if config.num_steps > 0:
        return config.num_steps
    num_samples = sum(len(samples) for samples in per_source)
    samples_per_step = config.global_batch_size
    if config.data.packing.enabled:
        weights = [float(s.get("weight", 1.0)) for s in config.data.sources]
        budget = packing.budget_of(config.data, modality_rows)
        per_pack = packer.estimate_samples_per_pack(per_source, weights, config.data, tokenizer, modality_rows, budget)
        logger.info(f"packing: about {per_pack:.2f} samples per pack (from the sources' text lengths)")
        samples_per_step *= per_pack
    return max(1, math.floor(config.train_epochs * num_samples / samples_per_step))


def train(
    config, workdir: str, *, new_schedule_ok: bool = False, step_timeout_s: float = 0.0, peer_wait_s: float = 60.0
) -> dict:
    """Runs (or resumes) training; returns the last logged metrics, and `stopped_at`: the step
    it saved and stopped at after a SIGTERM (None when it ran to the end).

    new_schedule_ok: resume a checkpoint whose schedule (num_steps, optim) differs from the
    config's, under the config's; otherwise that is an error. step_timeout_s: the watchdog's
    (training/watchdog.py; 0: none). peer_wait_s: how long to ask which peer was lost.
    """
    config_lib.check_config(config)
    _check_writable(workdir)
    _check_resumable(workdir)
    try:
        training_cpus, worker_cpus = runtime.split_cpus(config.data)
    except ValueError as error:
        raise SetupError(str(error)) from error
    timer = goodput.Goodput(workdir, writes_record=jax.process_index() == 0)
    options = {"new_schedule_ok": new_schedule_ok, "step_timeout_s": step_timeout_s, "peer_wait_s": peer_wait_s}
    # Pinned before JAX first runs here: XLA sizes its CPU thread pool by the CPUs it may use.
    with runtime.pinned_to(training_cpus):
        result = _train(config, workdir, worker_cpus, timer, options)
    if timer.reached:  # it trained: the workdir's record and the summary
        timer.save()
        logger.info(timer.summary())
    runtime.leave_in_order(wait_s=peer_wait_s)
    return result


def _check_writable(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise SetupError(f"cannot write to the workdir {workdir!r}: {error.strerror or error}") from None


def _check_resumable(workdir: str) -> None:
    # Its checkpoints' trees (parameters, optimizer state) name the Whisper encoder 'whisper',
    # which this model calls 'audio'; load_model reads the parameters under either name.
    if checkpoint.latest_step(workdir) is not None and checkpoint.stores_legacy_whisper(workdir):
        raise SetupError(
            f"the workdir {workdir!r} holds checkpoints of a Whisper model stored under the part name 'whisper', "
            "from before it was the part 'audio', and cannot be resumed: start a new workdir from its weights "
            f"with --config.init_checkpoint={workdir}"
        )


def _check_batch_divides(config, mesh) -> None:
    """Before any data is read or weights loaded: every micro-batch splits evenly over the
    devices that share the batch, and the global batch over the processes."""
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    per_step = config.global_batch_size
    if per_step % (config.num_microbatches * batch_devices) or per_step % jax.process_count():
        raise SetupError(
            f"global_batch_size={per_step} does not split into num_microbatches={config.num_microbatches} "
            f"micro-batches over the mesh's {batch_devices} batch devices (data x fsdp of {dict(mesh.shape)}) and "
            f"{jax.process_count()} process(es): use a multiple of {config.num_microbatches * batch_devices}"
        )


def _train(config, workdir: str, worker_cpus: set[int] | None, timer: goodput.Goodput, loop_options: dict) -> dict:
    if worker_cpus:
        logger.info(f"training on CPUs {sorted(os.sched_getaffinity(0))}, data workers on CPUs {sorted(worker_cpus)}")
    model_config, tokenizer, init_dir = resolve_model(config)
    # After resolve_model: the adapters are new weights, not overrides of the starting checkpoint's.
    model_config = optim.apply_lora(model_config, config.lora)
    check_data_matches_model(config.data, model_config)
    modality_rows = packing.ModalityRows.of(model_config, config.data)
    try:  # before any weights load: a malformed line, a missing file or a bad budget stops the run here
        per_source = pipeline.read_sources(config.data)
        num_steps = total_steps(config, per_source, tokenizer, modality_rows)
        # Phased training: each phase's share of the steps, and its samples (a phase with none stops here).
        phase_plan = phases.plan(config.phases, num_steps) if config.phases else None
        phase_lines = phases.describe(phase_plan, per_source, config.data.sources) if phase_plan else []
        cache = _open_feature_cache(config.data, per_source, model_config) if config.data.feature_cache else None
    except (ValueError, OSError) as error:  # FeatureCacheError too
        raise SetupError(str(error)) from error
    mesh = sharding.make_mesh(dict(config.mesh))
    _check_batch_divides(config, mesh)
    done = checkpoint.latest_step(workdir)
    if done is not None and done >= num_steps:
        logger.info(f"the run in {workdir} is finished: it saved step {done} of {num_steps}; nothing to do")
        return {"stopped_at": None, "interrupted": False}
    if jax.process_index() == 0:
        checkpoint.write_model_config(workdir, model_config)
        checkpoint.write_data_config(workdir, config.data)
        tokenizer.save_pretrained(workdir)
        with open(os.path.join(workdir, checkpoint.TRAIN_CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logger.info(
        f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); {num_steps} steps"
    )
    for line in phase_lines:
        logger.info(line)

    with jax.set_mesh(mesh):
        model = sharding.create_sharded_model(model_config, init_dir, mesh, config.init_seed)
        if cache is not None:
            try:
                cache.check(feature_cache.fingerprint(config.data, *model.encoder_identity()))
            except feature_cache.FeatureCacheError as error:
                raise SetupError(str(error)) from None
            logger.info(f"reading encoder features from the cache {cache.directory} ({len(cache.index)} files)")
        run = loop.Run(
            config=config,
            workdir=workdir,
            mesh=mesh,
            model_config=model_config,
            tokenizer=tokenizer,
            per_source=per_source,
            num_steps=num_steps,
            phase_plan=phase_plan,
            modality_rows=modality_rows,
            cache=cache,
            worker_cpus=worker_cpus,
            **loop_options,
        )
        return loop.train_steps(run, model, timer)


def _exit_interrupted(workdir: str):
    saved = checkpoint.latest_step(workdir)
    message = f"interrupted; the newest checkpoint is {f'step {saved}' if saved else 'none'} in {workdir}"
    print(f"\n{message}", file=sys.stderr)
    raise cli.Exit(errors.EXIT_INTERRUPTED, message)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.configure_logging(args, stream="stdout")  # training's log is its output
    cli.initialize_distributed(args)  # then process 0 logs for the job; each writes its own TensorBoard log
    try:
        result = train(
            args.config,
            args.workdir,
            new_schedule_ok=args.allow_new_schedule,
            step_timeout_s=args.step_timeout_s,
            peer_wait_s=args.heartbeat_timeout_s + 10,
        )
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the training loop
        _exit_interrupted(args.workdir)
    if result["interrupted"]:
        _exit_interrupted(args.workdir)
    if result["stopped_at"] is not None:
        sys.exit(PREEMPTED_EXIT_STATUS)


if __name__ == "__main__":
    main()
