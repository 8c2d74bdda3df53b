"""Training metrics: averaged between log lines, printed as one line and written to
TensorBoard event files (read with `tensorboard --logdir WORKDIR/logs`).

clu's metric writers would do the writing, but clu 0.0.12 imports TensorFlow as soon as its
metric_writers package is imported; the tensorboard package alone writes the same files.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from avllm_jax.data import pipeline
from avllm_jax.modality import LOSS_GROUPS

logger = logging.getLogger(__name__)


class TensorBoardWriter:
    def __init__(self, logdir: str):
        self._writer = EventFileWriter(logdir)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        values = [summary_pb2.Summary.Value(tag=name, simple_value=float(value)) for name, value in scalars.items()]
        self._writer.add_event(
            event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
        )

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsLog:
    """Averages the step metrics between log lines; each `flush` writes the interval's row to
    TensorBoard and prints it as one line:

        step 20/100 | loss 2.3456 (visual 2.1000, audio_visual 2.4000) | lr 1.00e-03 | grad norm 0.512
        | 2.00 steps/s, 16.0 samples/s, 160 answer tok/s, 0.064 TFLOP/s/device, mfu 12.8% (slots 20.1%)
        | eta 0m40s
        | skipped_media 1, skipped_text 0, rerouted 2, truncated 0

    (one line when printed). TFLOP/s and MFU count useful work only: `useful_flops` of the
    steps' summed `work` (real tokens, present media); "slots" is the MFU with every slot of
    the step counted (`slot_flops_per_step`), padding and empty media slots included. A
    modality with no answer token in the interval has no loss there; MFU is n/a when the
    device's peak is unknown (set config.peak_flops_per_device); the sample counts are totals
    over all processes since they started.

    With phases (`phase_of`: step -> its data.phases.Phase), the line names the logged step's
    phase after the step, `step 60/100 | phase 2/2 (visual+audio) | loss ...`, and TensorBoard
    gets its number as `phase`.
    """

    def __init__(
        self, writer, *, useful_flops, slot_flops_per_step, peak_flops, num_devices, total, start_step, phase_of=None
    ):
        self.writer, self.useful_flops, self.slot_flops_per_step = writer, useful_flops, slot_flops_per_step
        self.phase_of = phase_of
        self.peak_flops, self.num_devices, self.total = peak_flops, num_devices, total
        self.pending, self.counters = [], {name: 0 for name in pipeline.COUNTERS}
        self.last_time, self.last_step, self.start_time, self.start_step = (
            time.time(),
            start_step,
            time.time(),
            start_step,
        )

    def add(self, metrics, counters):
        self.pending.append(metrics)
        for name, value in counters.items():
            self.counters[name] += int(value)

    def flush(self, step_number, learning_rate, *, goodput=None) -> dict:
        """`goodput`: a training.goodput.Goodput, whose figures join the row and the line."""
        metrics = jax.device_get(self.pending)
        self.pending = []
        now = time.time()
        steps = step_number - self.last_step
        seconds = max(now - self.last_time, 1e-9)
        row = {}
        work = np.sum([m.pop("work") for m in metrics if "work" in m], axis=0)
        for key in metrics[0]:
            values = np.array([m[key] for m in metrics], np.float64)
            values = values[~np.isnan(values)]  # NaN: a loss group absent from that step's batch
            if values.size:
                row[key] = float(values.sum() if key == "target_tokens" else values.mean())
        per_device = seconds * self.num_devices
        row.update(
            learning_rate=float(learning_rate),
            steps_per_second=steps / seconds,
            samples_per_second=float(work[0]) / seconds if work.size else 0.0,
            target_tokens_per_second=row.pop("target_tokens", 0.0) / seconds,
            tflops_per_device=self.useful_flops(work) / per_device / 1e12,
            slot_tflops_per_device=steps * self.slot_flops_per_step / per_device / 1e12,
        )
        if self.peak_flops:
            row["mfu"] = row["tflops_per_device"] * 1e12 / self.peak_flops
            row["slot_mfu"] = row["slot_tflops_per_device"] * 1e12 / self.peak_flops
        counts = self._job_counts()
        row.update({f"data/{k}": float(v) for k, v in counts.items()})
        phase = self.phase_of(step_number) if self.phase_of else None
        if phase is not None:
            row["phase"] = float(phase.number)
        self.writer.write_scalars(step_number, row | (goodput.scalars() if goodput else {}))
        eta = (now - self.start_time) / max(step_number - self.start_step, 1) * (self.total - step_number)
        line = self._line(step_number, row, eta, counts, phase)
        logger.info(f"{line} | {goodput.short()}" if goodput else line)
        self.last_time, self.last_step = now, step_number
        return row

    def _job_counts(self) -> dict[str, int]:
        """The sample counts of all processes (each counts the samples it decodes)."""
        if jax.process_count() == 1:
            return dict(self.counters)
        totals = multihost_utils.process_allgather(np.array(list(self.counters.values()), np.int64)).sum(axis=0)
        return dict(zip(self.counters, totals.tolist()))

    def _line(self, step_number, row, eta, counts, phase=None) -> str:
        groups = ", ".join(f"{g} {row[f'loss/{g}']:.4f}" for g in LOSS_GROUPS if f"loss/{g}" in row)
        mfu = f"{row['mfu']:.1%} (slots {row['slot_mfu']:.1%})" if "mfu" in row else "n/a"
        counts = ", ".join(f"{name.removeprefix('num_')} {count}" for name, count in counts.items())
        return (
            f"step {step_number}/{self.total}{f' | {phase.label}' if phase is not None else ''}"
            f" | loss {row.get('loss', float('nan')):.4f}"
            f"{f' ({groups})' if groups else ''} | lr {row['learning_rate']:.2e} | grad norm "
            f"{row.get('grad_norm', float('nan')):.3g}"
            f" | {row['steps_per_second']:.2f} steps/s, {row['samples_per_second']:.1f} samples/s,"
            f" {row['target_tokens_per_second']:.0f} answer tok/s,"
            f" {row['tflops_per_device']:.3f} TFLOP/s/device, mfu {mfu} | eta {_duration(eta)} | {counts}"
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class SkipReport:
    """The samples this process dropped: how many of each kind, and the first few reasons."""

    MAX_LISTED = 10

    def __init__(self):
        self.reasons: list[str] = []

    def add(self, batch_reasons) -> None:
        for text in batch_reasons:
            self.reasons.extend(line for line in str(text).splitlines() if line)
        del self.reasons[self.MAX_LISTED :]

    def summary(self, counts: dict[str, int]) -> str | None:
        """None when nothing was skipped or re-routed."""
        if not any(counts.values()):
            return None
        lines = [
            "samples " + ", ".join(f"{name.removeprefix('num_').replace('_', ' ')}: {n}" for name, n in counts.items())
        ]
        lines += [f"  {reason}" for reason in self.reasons]
        return "\n".join(lines)
