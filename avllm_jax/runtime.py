"""Where a job runs: its processes (hosts) and, on each host, its CPUs.

Processes: a job runs on several processes when it is told so (`--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`, or the environment variables `AVLLM_COORDINATOR_ADDRESS`,
`AVLLM_NUM_PROCESSES`, `AVLLM_PROCESS_ID`) or when JAX can find the cluster itself: a SLURM
step or an Open MPI job of several tasks, or a Cloud TPU slice of several hosts. Otherwise it
is one process and `initialize_distributed` starts nothing.

Preemption: the scheduler sends SIGTERM. One process notes it and stops after its current
step. Several processes must stop at the same step (each saves its part of one checkpoint),
so they ask JAX's preemption sync point, which the coordination service answers alike for
all of them at a step after any of them got the signal.

A lost process: when a process dies (killed, out of memory, its host lost), the others must
not wait for it forever. A collective that it leaves fails at once on CPU (gloo: "connection
reset by peer"); `lost_processes` then asks the coordination service which processes are
gone, which it knows within the heartbeat timeout, and the training loop names them and exits
(PEER_LOST_EXIT_STATUS). A process that waits elsewhere (in a barrier, or in a GPU collective
that never fails) is ended by JAX's own client once the service declares the peer dead, within
the heartbeat timeout; when process 0, which hosts the service, dies, the others' clients end
them at once. docs/multihost.md gives the measured times.

CPUs: on a CPU host (the demo, tests) XLA's thread pool and the decoding processes compete for
the same cores, and XLA's threads stall waiting for one another; giving each side its own
CPUs avoids that (see README, Pipeline).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

import jax
from jax.experimental import multihost_utils

from avllm_jax.errors import AvllmError

logger = logging.getLogger(__name__)


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


ENVIRONMENT = {
    "coordinator_address": "AVLLM_COORDINATOR_ADDRESS",
    "num_processes": "AVLLM_NUM_PROCESSES",
    "process_id": "AVLLM_PROCESS_ID",
}


class DistributedError(AvllmError, RuntimeError):
    """The processes of a job cannot find each other; the message says which and where."""


def settings(coordinator_address=None, num_processes=None, process_id=None) -> dict:
    """The three settings from the arguments, each falling back on its environment variable."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    for name, variable in ENVIRONMENT.items():
        if given[name] is None and os.environ.get(variable):
            given[name] = os.environ[variable]
    try:
        for name in ("num_processes", "process_id"):
            given[name] = None if given[name] is None else int(given[name])
    except ValueError as error:
        raise DistributedError(f"num_processes and process_id must be integers ({error})") from None
    return given


def cluster_detected() -> bool:
    """Whether the environment is a multi-process job that `jax.distributed.initialize()` finds alone."""

    def count(variable):
        value = os.environ.get(variable, "")
        return int(value) if value.isdigit() else 0

    return (
        count("SLURM_STEP_NUM_TASKS") > 1
        or count("SLURM_NTASKS") > 1
        or count("OMPI_COMM_WORLD_SIZE") > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    )


PEER_LOST_EXIT_STATUS = 75  # EX_TEMPFAIL: rerun the job (on the hosts that are left)


def initialize_distributed(
    coordinator_address=None,
    num_processes=None,
    process_id=None,
    *,
    timeout_s: float = 300,
    heartbeat_s: float = 60,
    recoverable: bool = True,
) -> bool:
    """Starts `jax.distributed` when the job has several processes; returns whether it did.

    Call it before anything else uses JAX. Every wait is bounded by `timeout_s`: a coordinator
    that cannot be reached is a DistributedError, and a coordinator whose other processes do
    not all join in time ends the job (JAX aborts it, after the message printed here). A
    process that sends no heartbeat for `heartbeat_s` is declared dead (see the module docstring).
    """
    given = settings(coordinator_address, num_processes, process_id)
    explicit = {name: value for name, value in given.items() if value is not None}
    if explicit:
        missing = [f"--{name} (or ${ENVIRONMENT[name]})" for name in given if given[name] is None]
        if missing:
            raise DistributedError(f"a multi-process job needs all three settings; {', '.join(missing)} not set")
        if given["num_processes"] == 1:
            return False
        if not 0 <= given["process_id"] < given["num_processes"]:
            raise DistributedError(f"process_id {given['process_id']} is not in [0, {given['num_processes']})")
    elif not cluster_detected():
        return False
    # Collectives between CPU devices of different processes (tests, CPU clusters) need gloo;
    # GPU and TPU collectives do not read this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # A lost process is reported to the others' Python code (lost_processes) instead of JAX
    # aborting them the moment its coordination service declares it dead. Off for jobs whose
    # processes rely on the shutdown barrier to outlive process 0 (evaluation's).
    jax.config.update("jax_enable_recoverability", recoverable)
    if explicit:
        if given["process_id"] == 0:
            logger.info(
                f"coordinating {given['num_processes']} processes at {given['coordinator_address']}; "
                f"waiting up to {timeout_s:.0f} s for all to join"
            )
        else:
            _wait_for_coordinator(given["coordinator_address"], given["process_id"], given["num_processes"], timeout_s)
    global _coordinator_address
    _coordinator_address = given["coordinator_address"]
    jax.distributed.initialize(
        **explicit,
        initialization_timeout=max(1, int(timeout_s)),
        heartbeat_timeout_seconds=max(1, int(heartbeat_s)),
        shutdown_timeout_seconds=max(1, int(heartbeat_s)),
    )
    return True


_coordinator_address: str | None = None  # HOST:PORT of process 0, when given

# How a collective reports a peer that went away (gloo on CPU; the coordination service).
_PEER_FAILURE = re.compile(r"Gloo|[Cc]onnection (reset|closed|refused)|Socket closed|UNAVAILABLE|heartbeat")


def lost_processes(error: BaseException, wait_s: float) -> str | None:
    """When `error` is a peer's loss, a line naming the processes that are gone (asking the
    coordination service, which knows within its heartbeat timeout; at most `wait_s`); None
    when it is not (every process answers, or the error is of another kind)."""
    if jax.process_count() == 1 or not _PEER_FAILURE.search(str(error)):
        return None
    from jax._src import distributed  # the client of jax.distributed: no public accessor

    me = f"process {jax.process_index()} of {jax.process_count()}"
    if jax.process_index() > 0 and _coordinator_address and not _reachable(_coordinator_address):
        # Asked first: JAX's client aborts this process soon after the service is gone.
        return f"{me}: lost process 0, the coordinator at {_coordinator_address}"
    everyone = list(range(jax.process_count()))
    answer: dict = {}

    def ask():
        try:
            answer["live"] = distributed.global_state.client.get_live_nodes(everyone)
        except Exception as failure:
            answer["failure"] = failure

    asking = threading.Thread(target=ask, daemon=True)  # it waits for the live ones: bounded here
    asking.start()
    asking.join(wait_s)
    if "live" in answer:
        lost = [index for index in everyone if index not in answer["live"]]
        if not lost:
            return None
        return f"{me}: lost process {', '.join(map(str, lost))} (it stopped sending heartbeats)"
    if "failure" in answer:
        return f"{me}: lost process 0, the coordinator ({str(answer['failure']).splitlines()[0][:200]})"
    return (
        f"{me}: lost a peer ({str(error).splitlines()[0][:200]}); the coordinator did not say which in {wait_s:.0f} s"
    )


def leave_in_order(wait_s: float) -> None:
    """Ends this process's part in a multi-process job that finished (or stopped at a
    preemption) on every process: the others disconnect first, then process 0, which hosts the
    coordination service. (With the service recoverable, the others' disconnect is no longer
    a barrier: one that came after process 0 had gone made JAX abort that process.)"""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client of jax.distributed: no public accessor

    multihost_utils.sync_global_devices("avllm_jax: leaving")
    client = distributed.global_state.client
    if jax.process_index() == 0 and client is not None:
        everyone = list(range(jax.process_count()))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and len(client.get_live_nodes(everyone)) > 1:
            time.sleep(0.1)
    jax.distributed.shutdown()


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _wait_for_coordinator(address: str, process_id: int, num_processes: int, timeout_s: float) -> None:
    # JAX's own client aborts the process with a bare DEADLINE_EXCEEDED when the coordinator
    # never answers; trying the port first gives the user an error that says what is wrong.
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator_address {address!r} is not HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"process {process_id} of {num_processes} could not reach the coordinator at {address} within "
                    f"{timeout_s:.0f} s ({error}); start process 0 there, or check the address and port"
                ) from None
            time.sleep(0.5)


class PreemptionWatch:
    """`should_stop(step)` is True at the step where the job should stop: after a SIGTERM (to
    save, at the same step on every process), or after a first Ctrl-C in a single-process job
    (`interrupted`: to stop without saving, every worker and save closed cleanly; a second
    Ctrl-C interrupts at once)."""

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self.signalled = False
        self.interrupted = False
        self._previous_handlers = {}
        if not self.multi_process:
            # With several processes, JAX's coordination service listens for SIGTERM; a Ctrl-C
            # stops at once (one process stopping alone at a step boundary would leave the
            # others waiting in their collectives).
            self._previous_handlers = {
                signal.SIGTERM: signal.signal(signal.SIGTERM, self._note_term),
                signal.SIGINT: signal.signal(signal.SIGINT, self._note_interrupt),
            }

    def _note_term(self, signum, frame):
        del signum, frame
        self.signalled = True

    def _note_interrupt(self, signum, frame):
        del signum, frame
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # A print, not the log: a signal handler that takes logging's lock could deadlock.
        print("\ninterrupting after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def should_stop(self, step: int) -> bool:
        if self.interrupted:
            return True
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled

    def close(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
