"""Realistic batches for `train_step --data mix`: samples drawn from a modality mixture with
text lengths measured on an instruction file, laid out padded (one sample a row, every slot)
and packed (data/packer.py), so that both layouts are timed on the same sample stream."""

import dataclasses
import pathlib
import tempfile

import numpy as np

from avllm_jax.data import conversation, packer, packing
from avllm_jax.modality import IGNORE_INDEX, Modality
from benchmarks import _llava_profile

# The paper's training data (Sec. 4 and its Table 10): 260k audio-visual-dataset instructions
# (130k visual, 45k audio, 85k audio-visual), LLaVA's 650k images and Valley's 770k videos
# (visual).
PAPER_MIX = "visual=900,image=650,audio=45,audio_visual=85"
KINDS = {
    "visual": Modality.VISUAL,
    "image": Modality.VISUAL,
    "audio": Modality.AUDIO,
    "audio_visual": Modality.AUDIO_VISUAL,
}
MODALITY_TOKEN_IDS = (32000, 32001, 32002)
WARM_UP_PACKS = 8


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in KINDS or not weight:
            raise SystemExit(f"--mix: {part!r} is not KIND=WEIGHT with KIND one of {sorted(KINDS)}")
        mix[name] = float(weight)
    return mix


def text_lengths(path: str | None) -> list[tuple[int, int]]:
    """(prompt tokens, answer tokens) of each sample of an instruction JSONL, with a tokenizer
    trained on the file's own text. `path` None: 2000 samples of the LLaVA length profile
    (_llava_profile.py); "demo": 300 samples of the demo data; both generated in a temporary
    directory."""
    if path is None:
        path = _llava_profile.write_jsonl(pathlib.Path(tempfile.mkdtemp(prefix="mix_benchmark_")) / "llava.jsonl")
    elif path == "demo":
        from avllm_jax.data import synthetic

        path = synthetic.make_demo_split(tempfile.mkdtemp(prefix="mix_benchmark_"), "train", 300, seed=0)
    samples, _ = conversation.read_samples(path, pathlib.Path(path).parent)
    texts = [text for s in samples for _, text in s.turns]
    tokenizer = conversation.train_tokenizer([conversation.SYSTEM_PROMPT, *texts], vocab_size=8000)
    conversation.add_modality_tokens(tokenizer)
    lengths = []
    for sample in samples:
        _, labels = conversation.tokenize_turns(sample.turns, tokenizer)
        answer = int((labels != IGNORE_INDEX).sum())
        lengths.append((labels.size - answer, answer))
    return lengths


def describe(path: str | None) -> str:
    return {None: "the LLaVA length profile (tools/benchmarks/_llava_profile.py)", "demo": "the demo data"}.get(
        path, path
    )


@dataclasses.dataclass
class Sample:
    kind: str
    prompt: int
    answer: int


def draw_samples(
    count: int, mix: dict[str, float], lengths: list[tuple[int, int]], text_limit: int, seed: int = 0
) -> list[Sample]:
    rng = np.random.default_rng(seed)
    names = list(mix)
    weights = np.array([mix[n] for n in names]) / sum(mix.values())
    out = []
    for kind, index in zip(rng.choice(names, size=count, p=weights), rng.integers(0, len(lengths), count)):
        prompt, answer = lengths[index]
        out.append(Sample(str(kind), prompt, min(answer, text_limit - prompt)))
    return out


def prepared(sample: Sample, rng, *, num_frames: int, image_size: int, audio_shape: tuple) -> dict:
    """A sample as the pipeline prepares it for packing (random ids and media)."""
    modality = KINDS[sample.kind]
    length = sample.prompt + sample.answer
    ids = rng.integers(0, 32000, length).astype(np.int32)
    token_at = min(sample.prompt // 2, length - 1)
    ids[token_at] = MODALITY_TOKEN_IDS[list(Modality).index(modality)]
    labels = np.where(np.arange(length) >= sample.prompt, ids, IGNORE_INDEX).astype(np.int32)
    frames = 1 if sample.kind == "image" else num_frames
    return dict(
        input_ids=ids,
        labels=labels,
        modality_token_at=np.int32(token_at),
        frames=rng.integers(0, 256, (frames if modality.has_visual else 0, image_size, image_size, 3), dtype=np.uint8),
        audio_features=rng.standard_normal(audio_shape, dtype=np.float32),
        audio_is_longer=np.ones(audio_shape[0], bool),
        has_visual=np.bool_(modality.has_visual),
        has_audio=np.bool_(modality.has_audio),
    )


def padded_batch(samples: list[dict], text_length: int, num_frames: int, modality_rows) -> dict:
    """Today's unpacked layout: every sample its own row of text_length tokens and all slots."""
    batch = {}
    for s in samples:
        frames = np.zeros((num_frames, *s["frames"].shape[1:]), np.uint8)
        if s["frames"].shape[0]:
            frames[:] = s["frames"]  # a still repeated over T
        ids = np.zeros(text_length, np.int32)
        labels = np.full(text_length, IGNORE_INDEX, np.int32)
        ids[: s["input_ids"].size], labels[: s["labels"].size] = s["input_ids"], s["labels"]
        work = packing.sample_work(packing.footprint(s, modality_rows), modality_rows)
        row = dict(
            frames=frames,
            audio_features=s["audio_features"],
            audio_is_longer=s["audio_is_longer"],
            has_visual=s["has_visual"],
            has_audio=s["has_audio"],
            input_ids=ids,
            labels=labels,
            token_mask=np.arange(text_length) < s["input_ids"].size,
            work=work,
        )
        for key, value in row.items():
            batch.setdefault(key, []).append(value)
    return {k: np.stack(v) for k, v in batch.items()}


def packed_batch(
    samples: list[dict], budget: packing.PackBudget, num_packs: int, modality_rows, media_shapes, window: int
) -> tuple[dict, list[dict]]:
    """`num_packs` packs the packer (data/packer.py) fills from this stream once it runs steady:
    after its first WARM_UP_PACKS (a fresh window's first packs take the samples that match an
    empty pack, videos first; later ones also take what earlier packs left). (batch, their samples)."""
    plan = packer.plan([packing.footprint(s, modality_rows) for s in samples], budget, window)
    if sum(len(p) for p in plan[: WARM_UP_PACKS + num_packs]) + window > len(samples):
        raise SystemExit("not enough samples drawn to fill the packs")
    packs, used = [], []
    for pack in plan[WARM_UP_PACKS : WARM_UP_PACKS + num_packs]:
        chosen = [samples[i] for i, _, _ in pack]
        packs.append(packing.assemble(chosen, [p[1:] for p in pack], budget, modality_rows, 0, media_shapes))
        used += chosen
    return {k: np.stack([p[k] for p in packs]) for k in packs[0]}, used


def answer_tokens(samples: list[dict]) -> int:
    return int(sum((s["labels"] != IGNORE_INDEX).sum() for s in samples))
