"""Several processes sharing one evaluation run (a `jax.distributed` job).

Process 0 (the leader) reads the answer cache and tells the others which samples are still
unanswered; each process answers every `count`-th of them (its share) on its own devices;
the others send each finished batch to the leader, which writes them into the cache as they
come and alone judges, scores and writes the report. They talk through the coordination
service's key-value store (`client`: `key_value_set(key, value, allow_overwrite)`,
`key_value_dir_get(prefix)`, `key_value_delete(key)`), and every wait is bounded by
`timeout_s`: the leader gives up on a process that has sent nothing for that long (its
missing answers are counted as failed, and a rerun asks them again), and the others give up
on a leader that has shown no progress for that long.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from avllm_jax.errors import AvllmError

NAMESPACE = "avllm_jax/evaluate"
POLL_S = 0.2


class ProcessGroupError(AvllmError, RuntimeError):
    """A process that did not hear from another in time; the message says which and for how long."""


class ProcessGroup:
    def __init__(self, index: int, count: int, client, timeout_s: float, shutdown: Callable[[], None] | None = None):
        if not 0 <= index < count:
            raise ValueError(f"process index {index} is not in [0, {count})")
        self.index, self.count, self.timeout_s = index, count, timeout_s
        self._client, self._shutdown = client, shutdown
        self._posted = 0  # batches sent (others)
        self._progress = 0  # heartbeats (leader)

    @classmethod
    def of_this_job(cls, timeout_s: float) -> ProcessGroup | None:
        """The group of the running jax.distributed job; None when it has one process."""
        import jax

        if jax.process_count() == 1:
            return None
        from orbax.checkpoint import multihost

        return cls(
            jax.process_index(),
            jax.process_count(),
            multihost.get_jax_distributed_client(),
            timeout_s,
            shutdown=jax.distributed.shutdown,
        )

    @property
    def is_leader(self) -> bool:
        return self.index == 0

    def share(self, items: list, index: int | None = None) -> list:
        """The items process `index` (default: this one) answers: every `count`-th."""
        return items[(self.index if index is None else index) :: self.count]

    # -- key-value helpers -------------------------------------------------------------------

    def _set(self, key: str, value, overwrite: bool = False) -> None:
        self._client.key_value_set(f"{NAMESPACE}/{key}", json.dumps(value), allow_overwrite=overwrite)

    def _entries(self, directory: str) -> list[tuple[str, Any]]:  # Any: a JSON value
        prefix = f"{NAMESPACE}/{directory}/"
        return sorted((key[len(prefix) :], json.loads(value)) for key, value in self._client.key_value_dir_get(prefix))

    def _wait_for(self, directory: str, what: str, watch: str | None = None):
        """The value stored under `directory`, waiting while `watch` (a directory the other side
        updates as it works) changes at least every timeout_s."""
        last_change, last_seen = time.monotonic(), None
        while not (entries := self._entries(directory)):
            seen = self._entries(watch) if watch else None
            if seen != last_seen:
                last_change, last_seen = time.monotonic(), seen
            if time.monotonic() - last_change > self.timeout_s:
                raise ProcessGroupError(
                    f"process {self.index} of {self.count} waited {self.timeout_s:.0f} s for {what} in vain"
                )
            time.sleep(POLL_S)
        return entries[0][1]

    # -- the protocol --------------------------------------------------------------------------

    def broadcast_pending(self, sample_ids: list[str] | None) -> list[str]:
        """The leader passes the ids of the unanswered samples; every process gets them back."""
        if self.is_leader:
            if sample_ids is None:
                raise ValueError("the leader passes the ids of the unanswered samples")
            self._set("pending/ids", sample_ids)
            return sample_ids
        return self._wait_for("pending", "the list of unanswered samples from process 0")

    def send(self, records: list[dict], problems: list[tuple[str, str, str]]) -> None:
        """Another process's finished batch, for the leader; the leader notes its own progress."""
        if self.is_leader:
            self._beat()
            return
        self._set(
            f"results/{self.index}/{self._posted:09d}", {"records": records, "problems": [list(p) for p in problems]}
        )
        self._posted += 1

    def collect(self, take: Callable[[list[dict], list[tuple[str, str, str]]], None]) -> set[int]:
        """Leader: `take(records, problems)` for every batch the others sent since the last
        call; returns the processes heard from."""
        heard = set()
        for key, payload in self._entries("results"):
            self._client.key_value_delete(f"{NAMESPACE}/results/{key}")
            heard.add(int(key.split("/")[0]))
            take(payload["records"], [tuple(p) for p in payload["problems"]])
        return heard

    def finish(self, take: Callable[[list[dict], list[tuple[str, str, str]]], None]) -> list[int]:
        """The end of the answering. The others say they are done and wait until the leader has
        gathered everything. The leader takes the batches still to come until every process is
        done or has been silent for timeout_s, and returns the silent ones."""
        if not self.is_leader:
            self._set(f"done/{self.index}", True)
            self._wait_for("gathered", "process 0 to gather the answers", watch="progress")
            return []
        last_heard = {index: time.monotonic() for index in range(1, self.count)}
        while True:
            for index in self.collect(take):
                last_heard[index] = time.monotonic()
            done = {int(key) for key, _ in self._entries("done")}
            silent = [i for i in last_heard if i not in done and time.monotonic() - last_heard[i] > self.timeout_s]
            if done | set(silent) >= set(last_heard):
                self.collect(take)  # what the done processes sent just before saying so
                self._set("gathered/leader", True)
                return silent
            self._beat()  # the others wait while the leader waits
            time.sleep(POLL_S)

    def close(self) -> None:
        """Ends the job's multi-process part, all processes together, once the leader has every
        answer: the leader then judges alone, and the others exit without waiting for it."""
        if self._shutdown is not None:
            self._shutdown()

    def _beat(self) -> None:
        self._progress += 1
        self._set("progress/leader", self._progress, overwrite=True)
