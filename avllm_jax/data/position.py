"""Where a job's data stream stands, in terms that outlive the layout that read it.

The job reads one global stream of samples (the sources shuffled, repeated and mixed: index i
is the same sample, with the same random crops, whatever reads it). A *view* of it starts at a
global index and leaves out a few indices already used; a *layout* gives each process its part
of the view: its run of `per_host` consecutive elements in every global batch (unpacked), or
every `process_count`-th element (packed, per_host = 1).

Each element a pipeline yields carries `CONSUMED`, the global indices of the samples it holds
and of those dropped (undecodable) just before it, so a process knows exactly which samples it
has used: all of its part below a *frontier*, and a few past it (a packer takes samples out of
order from its window; the samples still in the window are not used yet).

`StreamIterator` wraps a pipeline's grain iterator with that record. Its state is grain's own
(exact resume on the same layout) plus the view, the layout and the record. On another layout
(another process count, per-process batch or worker count), `restore_states` reads every old
process's record and starts a new view at the first sample no process used, leaving out those
some process used past it: no sample is lost or repeated. When the old processes all stopped
at a global batch boundary with nothing dropped or held (unpacked, no bad media), that view is
the old stream from the same global sample on, in the same order, so training continues
exactly as on the old layout. Packed, the packs depend on the layout (each process packs its
own samples), so the samples are the same but not their grouping into packs.
"""

from __future__ import annotations

import bisect
import dataclasses

import grain
import numpy as np

CONSUMED = "consumed_indices"  # a string: space-separated global stream indices


@dataclasses.dataclass(frozen=True)
class View:
    """The global stream from `start`, without the indices in `skip` (sorted, each >= start)."""

    start: int = 0
    skip: tuple[int, ...] = ()

    def global_index(self, view_index: int) -> int:
        index = self.start + view_index
        skipped = 0
        while True:  # index = start + view_index + (skipped indices at or below it)
            below = bisect.bisect_right(self.skip, index)
            if below == skipped:
                return index
            index += below - skipped
            skipped = below

    def to_json(self) -> dict:
        return {"start": self.start, "skip": list(self.skip)}


@dataclasses.dataclass(frozen=True)
class Layout:
    process_count: int
    process_index: int
    per_host: int  # consecutive view elements of this process in each global batch
    worker_count: int = 0

    def view_index(self, position: int) -> int:
        """The view index of this process's `position`-th element."""
        batch, offset = divmod(position, self.per_host)
        return (batch * self.process_count + self.process_index) * self.per_host + offset

    def shape(self) -> tuple:
        """What must match for grain's own state to carry over."""
        return self.process_count, self.per_host, self.worker_count


class ViewDataset(grain.MapDataset):
    """The elements of `view` from a dataset indexed by global stream index."""

    def __init__(self, parent: grain.MapDataset, view: View):
        super().__init__(parent)
        self.view = view
        self._length = max(0, len(parent) - view.start - len(view.skip))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        return self._parent[self.view.global_index(index)]


class HostPart(grain.MapDataset):
    """This process's elements of a view: its run of `per_host` elements in each global batch,
    so that the processes' batches side by side are the batch one process would read, in its
    order. Whole global batches only."""

    def __init__(self, parent: grain.MapDataset, layout: Layout):
        super().__init__(parent)
        self.layout = layout
        self._length = len(parent) // (layout.per_host * layout.process_count) * layout.per_host

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        return self._parent[self.layout.view_index(index)]


class StreamIterator(grain.DatasetIterator):
    """A pipeline's batches (`build(view)`: its grain iterator over a view), each element's
    CONSUMED removed and added to this process's record; see the module docstring."""

    def __init__(self, build, layout: Layout):
        super().__init__()
        self._build, self.layout, self.view = build, layout, View()
        self._inner = build(self.view)
        self._frontier, self._past = 0, set[int]()

    def __next__(self) -> dict:
        batch = next(self._inner)
        for text in np.ravel(batch.pop(CONSUMED)):
            self._past.update(int(index) for index in str(text).split())
        while (next_index := self._global(self._frontier)) in self._past:
            self._past.discard(next_index)
            self._frontier += 1
        return batch

    def _global(self, position: int, layout: Layout | None = None, view: View | None = None) -> int:
        return (view or self.view).global_index((layout or self.layout).view_index(position))

    def get_state(self) -> dict:
        return {
            "grain": self._inner.get_state(),
            "view": self.view.to_json(),
            "layout": dataclasses.asdict(self.layout),
            "frontier": self._frontier,
            "past": sorted(self._past),
        }

    def set_state(self, state: dict) -> None:
        """This process's own state, saved on the same layout."""
        self._set_view(View(state["view"]["start"], tuple(state["view"]["skip"])))
        self._inner.set_state(state["grain"])
        self._frontier, self._past = state["frontier"], set(state["past"])

    def restore_states(self, states: list[dict]) -> str | None:
        """Continues from every process's state of a checkpoint (in process order); returns
        None on the same layout, else a line saying where the new view starts."""
        if "layout" not in states[0]:  # grain's state alone, saved before positions were recorded
            if len(states) != self.layout.process_count:
                raise ValueError(f"a data state of {len(states)} process(es) without positions resumes only on as many")
            self._inner.set_state(states[self.layout.process_index])
            return None
        old = [Layout(**s["layout"]) for s in states]
        if len(states) == self.layout.process_count and all(o.shape() == self.layout.shape() for o in old):
            self.set_state(states[self.layout.process_index])
            return None
        views = [View(s["view"]["start"], tuple(s["view"]["skip"])) for s in states]
        start = min(self._global(s["frontier"], layout, view) for s, layout, view in zip(states, old, views))
        used_past: set[int] = (
            set()
        )  # what some process used past `start`: its record, skipped views, its part below its frontier
        for state, layout, view in zip(states, old, views):
            used_past.update(state["past"], view.skip)
            position = state["frontier"] - 1
            while position >= 0 and (index := self._global(position, layout, view)) > start:
                used_past.add(index)
                position -= 1
        self._set_view(View(start, tuple(sorted(i for i in used_past if i > start))))
        self._frontier, self._past = 0, set()
        return (
            f"data: {len(states)} process(es) had used the global stream up to sample {start} and "
            f"{len(self.view.skip)} past it; continuing from there on {self.layout.process_count} process(es)"
        )

    def _set_view(self, view: View) -> None:
        if view != self.view:
            self._inner.close()
            self.view, self._inner = view, self._build(view)

    def start_prefetch(self) -> None:
        self._inner.start_prefetch()

    def close(self) -> None:
        self._inner.close()
