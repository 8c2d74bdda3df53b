"""Scalar metrics to TensorBoard event files (read with `tensorboard --logdir WORKDIR/logs`).

clu's metric writers would do this, but clu 0.0.12 imports TensorFlow as soon as its
metric_writers package is imported; the tensorboard package alone writes the same files.
"""
from __future__ import annotations

import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class TensorBoardWriter:
    def __init__(self, logdir: str):
        self._writer = EventFileWriter(logdir)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        values = [summary_pb2.Summary.Value(tag=name, simple_value=float(value)) for name, value in scalars.items()]
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
