"""Goodput: where a run's wall time goes, per run and summed over the restarts of a workdir.

Each run is timed from the moment the operating system started its process, or, for a later
run of the same process (tools/demo.py and tools/ablate.py train several in one), from the
moment it was set up:

    startup      until the training loop starts (imports, distributed start, reading the
                 sources, building and placing the model), restores not counted
    restore      reading a checkpoint back
    compile      the first step (tracing and compiling it, then its run)
    data_wait    waiting for the next batch from the data pipeline
    checkpoint   saving (the call that starts an async save, and the waits for one to finish)
    replayed     steps a crash made the run do again: those at or below the furthest step an
                 earlier run of the workdir reached
    productive   the rest of each step: dispatching it, its computation that the loop waits for,
                 logging
    other        what no category holds (closing the pipeline, writing the summary); the wall
                 time less the sum of the others

Process 0 keeps the record in `WORKDIR/goodput.json`, a list of runs rewritten at each log
line and at the end, so a run killed without warning keeps its figures up to its last log line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

CATEGORIES = ("productive", "startup", "restore", "compile", "data_wait", "checkpoint", "replayed")
RECORD_FILE = "goodput.json"

logger = logging.getLogger(__name__)


def process_start_time() -> float:
    """When this process started (seconds since the epoch), from /proc on Linux; now elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


_first_run_of_process = True


def run_start_time() -> float:
    """When the run being set up started: its process's start for the first run of a process
    (imports count as its start-up), now for a later one (the earlier runs' time is theirs)."""
    global _first_run_of_process
    started = process_start_time() if _first_run_of_process else time.time()
    _first_run_of_process = False
    return started


class Goodput:
    """The current run's seconds per category, and the earlier runs' from the record."""

    def __init__(self, workdir: str, *, writes_record: bool):
        self.path = os.path.join(workdir, RECORD_FILE)
        self.writes_record = writes_record
        self.started = run_start_time()
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.earlier = _read_runs(self.path)
        # Steps up to here were done by an earlier run: doing them again is a crash's cost.
        self.reached_before = max((run["reached"] for run in self.earlier), default=0)
        self.reached = 0
        self._loop_started: float | None = None

    @contextlib.contextmanager
    def timing(self, category: str):
        start = time.time()
        try:
            yield
        finally:
            self.seconds[category] += time.time() - start

    def loop_starts(self, step: int) -> None:
        """The training loop starts after `step`: the time until now, restores apart, was start-up."""
        self._loop_started = time.time()
        self.reached = step
        self.seconds["startup"] = self._loop_started - self.started - self.seconds["restore"]

    def step_done(self, step: int, seconds: float) -> None:
        """Step `step` took `seconds` of the loop besides the data wait, compile and checkpoint timed apart."""
        self.seconds["replayed" if step <= self.reached_before else "productive"] += seconds
        self.reached = max(self.reached, step)

    def this_run(self) -> dict:
        wall = time.time() - self.started
        return {
            "started": self.started,
            "wall_s": wall,
            "seconds": dict(self.seconds),
            "other_s": wall - sum(self.seconds.values()),
            "reached": self.reached,
        }

    def all_runs(self) -> list[dict]:
        return [*self.earlier, self.this_run()]

    def save(self) -> None:
        if self.writes_record:
            temporary = self.path + ".tmp"
            with open(temporary, "w") as f:
                json.dump({"runs": self.all_runs()}, f, indent=1)
            os.replace(temporary, self.path)  # a reader never sees half a record

    def scalars(self) -> dict[str, float]:
        """For TensorBoard: seconds per category, this run and all runs, and the productive shares."""
        run, total = self.this_run(), _summed(self.all_runs())
        scalars: dict[str, float] = {}
        for name, figures in (("run", run), ("all_runs", total)):
            scalars |= {f"goodput/{name}/{k}_s": v for k, v in figures["seconds"].items()}
            scalars[f"goodput/{name}/other_s"] = figures["other_s"]
            scalars[f"goodput/{name}/share"] = _share(figures)
        return scalars

    def short(self) -> str:
        """For the log line."""
        runs = self.all_runs()
        text = f"goodput {_share(runs[-1]):.0%}"
        return text + (f" (all {len(runs)} runs {_share(_summed(runs)):.0%})" if len(runs) > 1 else "")

    def summary(self) -> str:
        """The end of a run: this run's and every run's time per category."""
        runs = self.all_runs()
        lines = [_describe("goodput of this run", runs[-1])]
        if len(runs) > 1:
            lines.append(_describe(f"goodput of the workdir's {len(runs)} runs", _summed(runs)))
        return "\n".join(lines)


def _read_runs(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return json.load(f)["runs"]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError) as error:  # a record is not worth stopping a run for
        logger.info(f"{path} cannot be read ({error}); goodput counts this run alone")
        return []


def _summed(runs: list[dict]) -> dict:
    return {
        "wall_s": sum(r["wall_s"] for r in runs),
        "seconds": {k: sum(r["seconds"].get(k, 0.0) for r in runs) for k in CATEGORIES},
        "other_s": sum(r["other_s"] for r in runs),
    }


def _share(figures: dict) -> float:
    return figures["seconds"]["productive"] / max(figures["wall_s"], 1e-9)


def _describe(title: str, figures: dict) -> str:
    wall = figures["wall_s"]
    parts = [f"{k} {v:.1f} s ({v / max(wall, 1e-9):.0%})" for k, v in figures["seconds"].items()]
    parts.append(f"other {figures['other_s']:.1f} s")
    return f"{title}: {_share(figures):.1%} of {wall:.1f} s wall | " + ", ".join(parts)
