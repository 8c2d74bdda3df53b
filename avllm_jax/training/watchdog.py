"""A run that stops making progress says where it is stuck instead of hanging.

`Watchdog(workdir, timeout_s)`: when no step completes within `timeout_s` (the compiling first
step excluded: `paused()`), every thread's Python stack is appended to
`WORKDIR/hang_process_<i>.txt`, one line on stderr says so, and the process exits with
HANG_EXIT_STATUS. SIGUSR1 appends the same dump and the run goes on (Python's faulthandler
writes it from the signal handler, so it works while the main thread is stuck in a collective
or in C code).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

HANG_EXIT_STATUS = 124  # as timeout(1) returns


class Watchdog:
    def __init__(self, workdir: str, timeout_s: float, process_index: int):
        self.path = os.path.join(workdir, f"hang_process_{process_index}.txt")
        self.timeout_s = timeout_s
        self._dump = open(self.path, "a")
        faulthandler.register(signal.SIGUSR1, file=self._dump, all_threads=True, chain=False)
        self._last_progress, self._armed = time.monotonic(), timeout_s > 0
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="step watchdog", daemon=True)
            self._thread.start()

    def step_done(self) -> None:
        self._last_progress = time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        """No timeout inside (compiling); the clock restarts after."""
        armed, self._armed = self._armed, False
        try:
            yield
        finally:
            self._last_progress, self._armed = time.monotonic(), armed

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if self._armed and time.monotonic() - self._last_progress > self.timeout_s:
                self._dump.write(f"--- {time.ctime()}: no training step completed in {self.timeout_s:g} s\n")
                self._dump.flush()
                faulthandler.dump_traceback(file=self._dump, all_threads=True)
                self._dump.flush()
                print(
                    f"error: no training step completed in {self.timeout_s:g} s (--step_timeout_s); every thread's "
                    f"stack is in {self.path}; exiting",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(HANG_EXIT_STATUS)  # the stuck threads would keep a normal exit waiting

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        faulthandler.unregister(signal.SIGUSR1)
        self._dump.close()
        if os.path.getsize(self.path) == 0:  # no dump was asked for
            os.remove(self.path)
