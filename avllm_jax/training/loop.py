"""The training loop of `python -m avllm_jax.train`, from a resolved model and data to the last step.

Around the steps: the restore of the newest intact checkpoint (on whatever layout wrote it),
the saves, the metrics and goodput lines, SIGTERM and Ctrl-C, a watchdog for a step that never
ends, and a peer process that is lost (runtime.lost_processes): that ends the process at once,
naming it, so the in-flight checkpoint is left unpublished and the rerun resumes from the
newest complete one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avllm_jax import checkpoint, runtime
from avllm_jax.data import feature_cache, packing, phases, pipeline
from avllm_jax.models import avllm
from avllm_jax.training import (
    checkpointing,
    flops,
    goodput,
    metrics,
    optim,
    projector_init,
    sharding,
    step,
    watchdog,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """What the entry point resolved before the loop: the config, the model to build, the data."""

    config: Any  # ml_collections.ConfigDict: fields typed by the config file
    workdir: str
    mesh: jax.sharding.Mesh
    model_config: avllm.AVLLMConfig
    tokenizer: Any
    per_source: list
    num_steps: int
    phase_plan: list | None
    modality_rows: packing.ModalityRows
    cache: feature_cache.FeatureCache | None
    worker_cpus: set[int] | None
    new_schedule_ok: bool = False
    step_timeout_s: float = 0.0
    peer_wait_s: float = 60.0


def train_steps(run: Run, model, timer: goodput.Goodput) -> dict:
    """Makes the train state of `model` (restored when the workdir has a checkpoint), runs the
    steps and returns the last logged metrics with `stopped_at` and `interrupted` (see
    avllm_jax.train.train)."""
    try:
        return _run_steps(run, model, timer)
    except Exception as error:  # from the cleanup after the steps: the last save's wait, closing
        _exit_if_peer_lost(error, run)
        raise


def _run_steps(run: Run, model, timer: goodput.Goodput) -> dict:
    config, workdir, mesh = run.config, run.workdir, run.mesh
    trainable_filter = optim.trainable_filter(list(config.trainable))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)  # type: ignore[misc]
    num_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    num_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    logger.info(f"parameters: {num_trainable:,} trainable, {num_frozen:,} frozen")
    optimizer = optim.make_optimizer(config.optim, run.num_steps, trainable)
    opt_state = jax.jit(optimizer.init, out_shardings=sharding.optimizer_shardings(optimizer, trainable, mesh))(
        trainable
    )
    record = checkpointing.run_record(run.num_steps, config.optim, config.global_batch_size, mesh)
    with contextlib.ExitStack() as cleanup:
        data_iterator = _make_data_iterator(run)
        cleanup.callback(data_iterator.close)  # stops grain's worker processes, frees their shared memory
        manager = checkpointing.checkpoint_manager(
            workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints
        )
        cleanup.callback(manager.close)
        # Whatever ends the run (the last step, SIGTERM, a data error, a failing step,
        # Ctrl-C), the save in flight completes: the newest checkpoint stays loadable.
        cleanup.callback(_timed, timer, "checkpoint", manager.wait_until_finished)
        start = 0
        if manager.latest_step() is not None:
            with timer.timing("restore"):
                start, params, opt_state = checkpointing.restore_train_state(
                    manager, _abstract(nnx.state(model)), _abstract(opt_state), data_iterator, record,
                    new_schedule_ok=run.new_schedule_ok,
                )  # fmt: skip
                full_state = nnx.state(model)
                nnx.replace_by_pure_dict(full_state, params)
                nnx.update(model, full_state)
                graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)  # type: ignore[misc]
            logger.info(f"resumed from step {start} in {workdir}")
        elif config.projector_init == "centred":  # counted as start-up time
            projector_init.centre_projectors(model, _first_batches(run, config.projector_init_batches))
            graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)  # type: ignore[misc]
        state = step.TrainState(jnp.asarray(start, jnp.int32), trainable, opt_state)
        train_step = step.make_train_step(graphdef, optimizer, num_microbatches=config.num_microbatches)
        schedule = optim.learning_rate_schedule(config.optim, run.num_steps)
        writer = metrics.TensorBoardWriter(os.path.join(workdir, "logs", f"process_{jax.process_index()}"))
        cleanup.callback(writer.close)
        log = _metrics_log(run, writer, start)
        preemption = runtime.PreemptionWatch()
        cleanup.callback(preemption.close)
        skips = metrics.SkipReport()
        cleanup.callback(_report_skips, skips, log.counters, workdir)
        guard = watchdog.Watchdog(workdir, run.step_timeout_s, jax.process_index())
        cleanup.callback(guard.close)
        timer.loop_starts(start)
        row, stopped_at = {}, None
        try:
            for step_number in range(start + 1, run.num_steps + 1):
                iteration_start, timed_before = time.time(), _timed_apart(timer)
                with timer.timing("data_wait"):
                    host_batch = next(data_iterator)
                skips.add(host_batch.pop("skipped_reasons"))
                counters = {name: np.sum(host_batch.pop(name)) for name in pipeline.COUNTERS if name in host_batch}
                batch = sharding.shard_batch(host_batch, mesh)
                with _compiling(guard, timer) if step_number == start + 1 else contextlib.nullcontext():
                    state, step_metrics = train_step(state, frozen, batch)
                log.add(step_metrics, counters)
                stop = preemption.should_stop(step_number)
                preempted = stop and not preemption.interrupted  # SIGTERM: save; Ctrl-C: stop without saving
                if step_number % config.log_every == 0 or step_number == run.num_steps or preempted:
                    row = log.flush(step_number, schedule(step_number - 1), goodput=timer)
                    timer.save()
                if step_number % config.checkpoint_every == 0 or step_number == run.num_steps or preempted:
                    with timer.timing("checkpoint"):
                        checkpointing.save_train_state(
                            manager, step_number, nnx.merge_state(state.params, frozen), state.opt_state,
                            data_iterator, record, force=True,
                        )  # fmt: skip
                timer.step_done(step_number, time.time() - iteration_start - (_timed_apart(timer) - timed_before))
                guard.step_done()
                if stop:
                    stopped_at = step_number
                    break
        except Exception as error:
            _exit_if_peer_lost(error, run)
            raise
    if stopped_at is not None and not preemption.interrupted:
        logger.info(
            f"preempted: saved step {stopped_at} of {run.num_steps} in {workdir}; rerun the same command to continue"
        )
    # An interruption is reported by main, the workers and the save in flight finished. (Raising
    # KeyboardInterrupt here instead kept this frame's batch alive in the traceback, and with it
    # the grain workers' shared memory, which then leaked.)
    return row | {"stopped_at": stopped_at, "interrupted": preemption.interrupted}


@contextlib.contextmanager
def _compiling(guard: watchdog.Watchdog, timer: goodput.Goodput):
    """The first step: compiled, so timed as compilation and not by the watchdog."""
    with guard.paused(), timer.timing("compile"):
        yield


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _timed(timer: goodput.Goodput, category: str, function) -> None:
    with timer.timing(category):
        function()


def _timed_apart(timer: goodput.Goodput) -> float:
    """The seconds of the categories a step's time is counted without."""
    return sum(timer.seconds[k] for k in ("data_wait", "compile", "checkpoint"))


def _make_data_iterator(run: Run):
    options = {
        "global_batch_size": run.config.global_batch_size,
        "worker_cpus": run.worker_cpus,
        "modality_rows": run.modality_rows,
        "cache": run.cache,
    }
    if run.phase_plan:  # each phase's own pipeline, made as it starts; the state holds the phase
        return phases.make_phased_iterator(
            run.config.data, run.phase_plan, run.tokenizer, per_source=run.per_source, **options
        )
    return pipeline.make_train_iterator(run.config.data, run.tokenizer, per_source=run.per_source, **options)


def _first_batches(run: Run, count: int):
    """The run's first `count` batches (fewer if the data ends first), from an iterator of their
    own: the run's own starts from the beginning."""
    iterator = _make_data_iterator(run)
    try:
        for host_batch in itertools.islice(iterator, count):
            for name in ("skipped_reasons", *pipeline.COUNTERS):
                host_batch.pop(name, None)
            yield sharding.shard_batch(host_batch, run.mesh)
    finally:
        iterator.close()


def _metrics_log(run: Run, writer, start: int) -> metrics.MetricsLog:
    config = run.config
    return metrics.MetricsLog(
        writer,
        useful_flops=functools.partial(
            flops.work_flops,
            run.model_config,
            llm_trains=flops.llm_trains(config),
            encoders=not config.data.feature_cache,
        ),
        slot_flops_per_step=flops.slot_flops_per_step(run.model_config, config),
        peak_flops=config.peak_flops_per_device or flops.peak_flops_per_device(jax.devices()[0]),
        num_devices=jax.device_count(),
        total=run.num_steps,
        start_step=start,
        phase_of=functools.partial(phases.phase_at, run.phase_plan) if run.phase_plan else None,
    )


def _exit_if_peer_lost(error: BaseException, run: Run) -> None:
    """Ends the process at once when `error` is a lost peer's: waiting for the save in flight, or
    for JAX's shutdown, would wait for the lost process."""
    line = runtime.lost_processes(error, run.peer_wait_s)
    if line is None:
        return
    # Read from the directory: orbax's CheckpointManager would wait for the lost process. A step
    # is published by renaming its finished temporary directory, so a number is a complete step.
    directory = os.path.join(run.workdir, checkpoint.CHECKPOINTS_DIR)
    saved = max((int(name) for name in os.listdir(directory) if name.isdigit()), default=None)
    print(
        f"error: {line}; the newest complete checkpoint is {f'step {saved}' if saved else 'none'} in "
        f"{run.workdir}: rerun the job to resume from it",
        file=sys.stderr,
        flush=True,
    )
    os._exit(runtime.PEER_LOST_EXIT_STATUS)


def _report_skips(skips: metrics.SkipReport, counts: dict, workdir: str) -> None:
    """Prints what this process dropped or re-routed and writes it to the workdir."""
    summary = skips.summary(counts)
    if summary is None:
        return
    path = os.path.join(workdir, f"skipped_samples_process_{jax.process_index()}.txt")
    with open(path, "w") as f:
        f.write(summary + "\n")
    logger.info(f"{summary}\n(written to {path})")
