"""Where the training process and its data workers run: splitting this host's CPUs between them.

On a CPU host (the demo, tests) XLA's thread pool and the decoding processes compete for the
same cores, and XLA's threads stall waiting for one another; giving each side its own CPUs
avoids that (see README, Pipeline).
"""
from __future__ import annotations

import contextlib
import os


def split_cpus(data_config) -> tuple[set[int] | None, set[int] | None]:
    """(CPUs of the training process, CPUs of the decoding processes) as
    `dedicated_worker_cpus` asks; (None, None) when they share all of them, as they do
    without decoding processes (worker_count = 0)."""
    count = data_config.dedicated_worker_cpus
    if not count or data_config.worker_count == 0:
        return None, None
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("data.dedicated_worker_cpus needs CPU affinity (Linux); set it to 0 on this system")
    available = sorted(os.sched_getaffinity(0))
    if count >= len(available):
        raise ValueError(
            f"data.dedicated_worker_cpus={count} leaves none of this process's {len(available)} CPUs for training"
        )
    return set(available[:-count]), set(available[-count:])


@contextlib.contextmanager
def pinned_to(cpus: set[int] | None):
    """Runs the block with every thread of this process on `cpus` (None: unchanged), then
    restores the CPUs it had. Threads started inside inherit the pinning."""
    if cpus is None:
        yield
        return
    original = os.sched_getaffinity(0)
    pin_process(cpus)
    try:
        yield
    finally:
        pin_process(original)


def pin_process(cpus: set[int]) -> None:
    """Restricts every thread of this process to `cpus`."""
    for thread_id in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread_id), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
