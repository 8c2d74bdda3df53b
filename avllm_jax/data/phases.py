"""Phased training (the paper's Table 4): the steps in phases, each drawing only the samples of
the modalities it lists.

`config.phases` is a tuple of `dict(modalities=(...), share=s)`; empty (the default) is the
paper's modality-augmented training (MAT): one phase, every modality mixed in each batch.
PT1 is `(dict(modalities=("audio_visual", "text"), share=0.5), dict(modalities=("visual",
"audio", "text"), share=0.5))`, PT2 the same phases in the other order (configs/ablations/).

- The names are the modalities' ('visual', 'audio', 'audio_visual') and 'text' for text-only
  samples (no modality token). A phase takes the samples whose modality it names, as their
  token requests it (a request that decoding re-routes to the streams the file has, counted
  as `rerouted`, stays in the phase of its token); samples that no phase names are left out of
  the run, and training says how many.
- The phases split the run's steps (num_steps, or what train_epochs gives over all the sources,
  as without phases, so that MAT, PT1 and PT2 take equal steps) by their shares, which sum to
  one: phase i ends at step round(num_steps · (share_1 + ... + share_i)). The boundary is
  fixed by the config, not by the data; every phase needs at least one step.
- A phase's batches come from the pipeline of data/pipeline.py over the sources filtered to
  its modalities, mixed by the sources' weights, each repeated as often as the phase needs
  (so data.source_epochs must be None). A source with no sample of a phase's modalities is left
  out of that phase (training prints it); a phase that no source has samples for is an error.
  Phase p (counted from 0) shuffles with data.shuffle_seed + 1000 · p: a sample in two phases comes in another order.
- `PhasedIterator` counts the batches it gives (batch k is step k's) and reads each from the
  phase of its step; its state holds the count, the phase it reads and that phase pipeline's
  own state, so a run resumed in phase 2 continues there exactly, and one saved at the
  boundary starts phase 2 as an uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import math
import os

import grain

from avllm_jax.data import pipeline
from avllm_jax.modality import Modality

TEXT = "text"  # the name of text-only samples, as in the loss groups
MODALITY_NAMES = (*(m.value for m in Modality), TEXT)
PHASE_FIELDS = ("modalities", "share")
SHARE_TOLERANCE = 1e-6
_SEED_STRIDE = 1000  # phase p shuffles with data.shuffle_seed + p * _SEED_STRIDE


def modality_name(sample) -> str:
    """The phase name of a sample's modality: 'visual', 'audio', 'audio_visual' or 'text'."""
    return sample.modality.value if sample.modality is not None else TEXT


@dataclasses.dataclass(frozen=True)
class Phase:
    """Phase `number` (from 1) of `count`: steps `first_step` to `last_step` (inclusive)."""

    number: int
    count: int
    modalities: tuple[str, ...]
    first_step: int
    last_step: int

    @property
    def num_steps(self) -> int:
        return self.last_step - self.first_step + 1

    @property
    def label(self) -> str:
        return f"phase {self.number}/{self.count} ({'+'.join(self.modalities)})"


def config_problems(config) -> list[str]:
    """What is wrong with `config.phases` (each problem names its field), for check_config."""
    phases = config.phases
    if not isinstance(phases, (tuple, list)):
        return [f"config.phases must be a tuple of dict(modalities=(...), share=...), not {phases!r}"]
    problems, shares = [], []
    for index, phase in enumerate(phases):
        name = f"config.phases[{index}]"
        if not hasattr(phase, "keys"):
            problems.append(f"{name} must be a dict(modalities=(...), share=...), not {phase!r}")
            continue
        problems += [
            f"{name}.{key} is not a field of a phase (it has {', '.join(PHASE_FIELDS)})"
            for key in phase.keys()
            if key not in PHASE_FIELDS
        ]
        problems += [f"{name} lacks {key}" for key in PHASE_FIELDS if key not in phase]
        modalities = phase.get("modalities")
        if "modalities" not in phase:
            pass
        elif isinstance(modalities, str) or not isinstance(modalities, (tuple, list)):
            problems.append(f"{name}.modalities must be a tuple of names, e.g. ('audio_visual',), not {modalities!r}")
        elif not modalities:
            problems.append(f"{name}.modalities is empty: name at least one of {', '.join(map(repr, MODALITY_NAMES))}")
        else:
            problems += [
                f"{name}.modalities names {m!r}, not a modality (choose from {', '.join(map(repr, MODALITY_NAMES))})"
                for m in modalities
                if m not in MODALITY_NAMES
            ]
            if len(set(modalities)) != len(modalities):
                problems.append(f"{name}.modalities={tuple(modalities)!r} names a modality twice")
        share = phase.get("share")
        if "share" not in phase:
            pass
        elif isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share <= 0:
            problems.append(f"{name}.share={share!r}: it must be a positive number (the phase's fraction of the steps)")
        else:
            shares.append(share)
    if phases and len(shares) == len(phases) and abs(sum(shares) - 1) > SHARE_TOLERANCE:
        problems.append(f"config.phases' shares {tuple(shares)!r} sum to {sum(shares):g}, not 1")
    if phases and config.data.source_epochs is not None:
        problems.append(
            f"config.phases needs config.data.source_epochs=None, not {config.data.source_epochs}: each phase "
            "repeats its samples for as many steps as its share takes"
        )
    return problems


def plan(phases_config, num_steps: int) -> list[Phase]:
    """The phases' step ranges over a run of `num_steps` (phases_config checked by config_problems)."""
    ends, total = [], 0.0
    for phase in phases_config:
        total += phase["share"]
        ends.append(math.floor(num_steps * total + 0.5))
    ends[-1] = num_steps
    phases, first = [], 1
    for index, (phase, end) in enumerate(zip(phases_config, ends)):
        phases.append(Phase(index + 1, len(ends), tuple(phase["modalities"]), first, end))
        first = end + 1
    if short := [p for p in phases if p.num_steps < 1]:
        raise ValueError(
            f"{num_steps} steps leave {short[0].label} (share {phases_config[short[0].number - 1]['share']}) "
            "no step: a run with phases needs more steps"
        )
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that step `step` (from 1) trains in; past the last step, the last phase."""
    return next((p for p in phases if step <= p.last_step), phases[-1])


def _source_name(source) -> str:
    return os.path.basename(source["path"])


def _counts(samples) -> dict[str, int]:
    counts = dict.fromkeys(MODALITY_NAMES, 0)
    for sample in samples:
        counts[modality_name(sample)] += 1
    return counts


def describe(phases: list[Phase], per_source, sources) -> list[str]:
    """Lines saying what each phase trains on, and what no phase takes; a ValueError when a phase
    has no samples at all. Before training starts, from the sources' samples."""
    counts = [_counts(samples) for samples in per_source]
    lines = []
    for phase in phases:
        held = [sum(c[m] for m in phase.modalities) for c in counts]
        if not any(held):
            have = "; ".join(
                f"{_source_name(s)}: " + ", ".join(f"{m} {n}" for m, n in c.items() if n)
                for s, c in zip(sources, counts)
            )
            raise ValueError(
                f"{phase.label} has no samples: no source holds {' or '.join(phase.modalities)} samples ({have})"
            )
        parts = [
            f"{_source_name(s)}: {n} samples" if n else f"{_source_name(s)}: none, left out of this phase"
            for s, n in zip(sources, held)
        ]
        lines.append(
            f"{phase.label}: steps {phase.first_step}-{phase.last_step} of {phases[-1].last_step}; {', '.join(parts)}"
        )
    named = {m for phase in phases for m in phase.modalities}
    unused = [
        f"{n} {m} samples of {_source_name(s)}"
        for s, c in zip(sources, counts)
        for m, n in c.items()
        if n and m not in named
    ]
    if unused:
        lines.append(f"in no phase, so not trained on: {', '.join(unused)}")
    return lines


def phase_data(phase: Phase, data_config, per_source):
    """(the phase's data config, its sources' samples): the sources filtered to the phase's
    modalities, those left empty dropped, and the phase's seed."""
    kept = [
        (source, [s for s in samples if modality_name(s) in phase.modalities])
        for source, samples in zip(data_config.sources, per_source)
    ]
    kept = [(source, samples) for source, samples in kept if samples]
    config = data_config.copy_and_resolve_references()
    config.shuffle_seed = data_config.shuffle_seed + (phase.number - 1) * _SEED_STRIDE
    config.sources = tuple(source for source, _ in kept)
    return config, [samples for _, samples in kept]


def make_phased_iterator(data_config, phases: list[Phase], tokenizer, *, per_source, **kwargs) -> PhasedIterator:
    """A PhasedIterator over `phases` (see `plan`); `kwargs` as pipeline.make_train_iterator's."""

    def make(phase):
        config, samples = phase_data(phase, data_config, per_source)
        return pipeline.make_train_iterator(config, tokenizer, per_source=samples, **kwargs)

    return PhasedIterator(phases, make)


class PhasedIterator(grain.DatasetIterator):
    """This host's batches, phase by phase: batch k is step k's, from the phase that step is in
    (`phase_at`). `make_phase(phase)` is a phase's grain iterator, made when the phase starts
    (the previous one closed, its worker processes stopped).

    State: {"batches": batches taken, "phase": the number of the phase the inner iterator
    reads, "modalities": every phase's, "inner": that iterator's state}. Restored, it reads on
    in that phase, or starts the phase of the next step afresh when that is another (a state
    saved at a boundary). A state of other phases' modalities is a ValueError. Past the last
    phase's steps the last phase goes on."""

    _closed: bool  # set by grain.DatasetIterator.__init__ (grain ships no type information)

    def __init__(self, phases: list[Phase], make_phase):
        super().__init__()
        self.phases, self._make_phase = phases, make_phase
        self._batches, self._index = 0, 0
        self._inner = make_phase(phases[0])

    @property
    def phase(self) -> Phase:
        """The phase of the next batch."""
        return phase_at(self.phases, self._batches + 1)

    def __next__(self):
        self._assert_not_closed()
        phase = self.phase
        if phase.number - 1 != self._index:
            self._enter(phase.number - 1)
        try:
            batch = next(self._inner)
        except StopIteration:
            taken = self._batches - phase.first_step + 1
            raise pipeline.DataError(
                f"{phase.label} ran out of samples after {taken} of its {phase.num_steps} "
                "batches: set data.source_epochs=None"
            ) from None
        self._batches += 1
        return batch

    def _enter(self, index: int) -> None:
        self._inner.close()
        self._index = index
        self._inner = self._make_phase(self.phases[index])

    def get_state(self) -> dict:
        return {
            "batches": self._batches,
            "phase": self._index + 1,
            "modalities": [list(p.modalities) for p in self.phases],
            "inner": self._inner.get_state(),
        }

    def set_state(self, state: dict) -> None:
        self._enter_saved(state)
        self._inner.set_state(state["inner"])

    def restore_states(self, states: list[dict]) -> str | None:
        """Every process's state of a checkpoint, perhaps of another layout (position.StreamIterator)."""
        self._enter_saved(states[0])
        return self._inner.restore_states([state["inner"] for state in states])

    def _enter_saved(self, state: dict) -> None:
        saved = [tuple(m) for m in state["modalities"]]
        if saved != [p.modalities for p in self.phases]:
            raise ValueError(
                f"the data iterator was saved with the phases {saved}, but config.phases has "
                f"{[p.modalities for p in self.phases]}: resume with the phases it was saved with"
            )
        self._batches = state["batches"]
        if state["phase"] - 1 != self._index:
            self._enter(state["phase"] - 1)

    def start_prefetch(self) -> None:
        self._inner.start_prefetch()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inner.close()
