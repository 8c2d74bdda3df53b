"""Textual contexts of media files: frame captions V_c and audio captions A_c (paper §3.3).

Frames and audio segments are sampled with `load_media`; any `transformers` image-to-text
model (BLIP by default) captions each frame, and an audio captioner captions each segment.
The built-in audio captioner labels segments zero-shot with CLAP against a label list; any
callable from a list of float32 [L] segments to their captions can take its place. Output: one JSON line per file,
`{"id", "video"|"image"|"audio": path, "visual_captions": [...], "audio_captions": [...]}`,
the path relative to the output file's directory (the data pipeline's convention).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from avllm_jax.curation.instructions import read_finished
from avllm_jax.data.media import MediaError, load_media

DEFAULT_FRAME_CAPTIONER = "Salesforce/blip-image-captioning-large"
DEFAULT_CLAP = "laion/clap-htsat-unfused"
DEFAULT_AUDIO_LABELS = Path(__file__).parent / "audio_labels.txt"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MEDIA_SUFFIXES = IMAGE_SUFFIXES | {
    ".mp4",
    ".mkv",
    ".webm",
    ".avi",
    ".mov",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".flv",
    ".gif",
    ".wav",
    ".flac",
    ".mp3",
    ".ogg",
    ".m4a",
    ".aac",
    ".opus",
}

FrameCaptioner = Callable[[list[np.ndarray]], list[str]]  # B frames uint8 [S, S, 3] -> B captions
AudioCaptioner = Callable[[list[np.ndarray]], list[str]]  # B segments float32 [L] (lengths vary by file) -> B captions


class TransformersCaptioner:
    """Captions frames with an image-to-text model (BLIP, BLIP-2, ...: any that
    `AutoModelForImageTextToText` loads and that captions an image without a chat template),
    from the Hugging Face hub or a local path. `prompt` starts each caption (e.g. "a video of")."""

    def __init__(
        self,
        model: str = DEFAULT_FRAME_CAPTIONER,
        *,
        device: str = "cpu",
        max_new_tokens: int = 30,
        prompt: str | None = None,
    ):
        import transformers  # heavy; only needed when captioning

        self.processor = transformers.AutoProcessor.from_pretrained(model)
        loaded = transformers.AutoModelForImageTextToText.from_pretrained(model)
        # The ignore: transformers wraps `to` in functools.wraps, left unbound by typeshed (the device reads as self).
        self.model = loaded.to(device).eval()  # type: ignore[arg-type]
        self.device, self.max_new_tokens, self.prompt = device, max_new_tokens, prompt
        size = getattr(self.processor.image_processor, "size", None) or {}
        # load_media centre-crops to a square; hand the processor frames at its own input size.
        self.image_size = int(size.get("height") or size.get("shortest_edge") or 384)

    def __call__(self, frames: list[np.ndarray]) -> list[str]:
        import torch

        kwargs = {"text": [self.prompt] * len(frames)} if self.prompt else {}
        inputs = self.processor(images=list(frames), return_tensors="pt", **kwargs).to(self.device)
        with torch.inference_mode():
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        captions = [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]
        if self.prompt:  # the model continues the prompt: keep only what it added
            prompt = self.prompt.strip().lower()
            captions = [c[len(prompt) :].strip() if c.lower().startswith(prompt) else c for c in captions]
        return captions


class ClapLabeller:
    """Zero-shot audio captions: each segment gets the label whose CLAP text embedding is
    closest to its audio embedding, written into `template`."""

    def __init__(
        self, labels: list[str], model: str = DEFAULT_CLAP, *, template: str = "The sound of {}.", device: str = "cpu"
    ):
        import torch
        import transformers

        if not labels:
            raise ValueError("ClapLabeller needs at least one label")
        self.processor = transformers.AutoProcessor.from_pretrained(model)
        loaded = transformers.ClapModel.from_pretrained(model)
        # The ignore: transformers wraps `to` in functools.wraps, left unbound by typeshed (the device reads as self).
        self.model = loaded.to(device).eval()  # type: ignore[arg-type]
        self.labels, self.template, self.device = list(labels), template, device
        self.sample_rate = self.processor.feature_extractor.sampling_rate
        text = self.processor(text=[template.format(label) for label in labels], return_tensors="pt", padding=True)
        with torch.inference_mode():
            self.label_embeddings = _pooled(self.model.get_text_features(**text.to(device)))

    def __call__(self, segments: list[np.ndarray]) -> list[str]:
        import torch

        inputs = self.processor(audio=list(segments), sampling_rate=self.sample_rate, return_tensors="pt")
        with torch.inference_mode():
            audio = _pooled(self.model.get_audio_features(**inputs.to(self.device)))
        best = (audio @ self.label_embeddings.T).argmax(dim=-1).tolist()
        return [self.template.format(self.labels[i]) for i in best]


def _pooled(features):
    """Unit-norm embeddings, whether get_*_features returned a tensor or a model output."""
    import torch

    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1)


def read_labels(path: str | os.PathLike = DEFAULT_AUDIO_LABELS) -> list[str]:
    """One label per line; blank lines and lines starting with '#' are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    labels = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not labels:
        raise ValueError(f"{path}: no labels")
    return labels


def find_media(inputs: list[str | os.PathLike]) -> list[tuple[str, str]]:
    """(id, path) of each media file: files as given (id = file name without suffix), directories
    searched recursively (id = path below the directory, without suffix)."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            for path in sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES):
                found.append((path.relative_to(item).with_suffix("").as_posix(), str(path)))
        elif item.is_file():
            found.append((item.stem, str(item)))
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    ids = Counter(i for i, _ in found)
    if repeated := [i for i, n in ids.items() if n > 1]:
        raise ValueError(f"several media files share the ids {repeated[:5]}; pass their directory instead")
    return found


def _caption_in_batches(captioner, items: list[np.ndarray], batch_size: int) -> list[str]:
    captions = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        out = captioner(batch)
        if len(out) != len(batch):
            raise RuntimeError(f"captioner returned {len(out)} captions for {len(batch)} inputs")
        captions.extend(out)
    return captions


def extract_contexts(
    media: list[tuple[str, str]],
    out_path: str | os.PathLike,
    frame_captioner: FrameCaptioner,
    audio_captioner: AudioCaptioner | None,
    *,
    num_frames: int = 8,
    image_size: int = 384,
    num_audio_segments: int = 4,
    sample_rate: int = 48000,
    batch_size: int = 32,
    decode_workers: int = 4,
) -> Counter:
    """Captions every (id, path) in `media` not already in `out_path`, appending one line each.

    Files are decoded `decode_workers` at a time, the next group while the current one is
    captioned; the frames (and audio segments) of several files go through the captioners
    together, `batch_size` at a time. Unreadable files are
    skipped, reported and counted. Returns this run's counts.
    """
    done = {record["id"] for record in read_finished(out_path)}
    out_dir = Path(out_path).absolute().parent
    todo = [(i, p) for i, p in media if i not in done]
    counts = Counter(already_done=len(media) - len(todo))
    files_per_group = max(decode_workers, batch_size // max(num_frames, 1))
    groups = [todo[start : start + files_per_group] for start in range(0, len(todo), files_per_group)]

    def decode(item):
        try:
            return item, load_media(
                item[1],
                num_frames=num_frames,
                image_size=image_size,
                num_audio_segments=num_audio_segments,
                audio_sample_rate=sample_rate,
            )
        except MediaError as error:
            return item, error

    with (
        open(out_path, "a", encoding="utf-8") as out,
        concurrent.futures.ThreadPoolExecutor(decode_workers) as pool,
        tqdm(total=len(todo), desc="captioning", unit="file") as progress,
    ):
        upcoming = [pool.submit(decode, item) for item in groups[0]] if groups else []
        for number in range(len(groups)):
            results = [future.result() for future in upcoming]
            # Decode the next group while this one is captioned.
            upcoming = [pool.submit(decode, item) for item in groups[number + 1]] if number + 1 < len(groups) else []
            decoded = []
            for (media_id, path), result in results:
                if isinstance(result, MediaError):
                    counts["unreadable"] += 1
                    progress.write(f"skipped: {result}")
                    progress.update()
                else:
                    decoded.append((media_id, path, result))
            frames = [frame for _, _, m in decoded if m.has_visual for frame in m.frames]
            frame_captions = iter(_caption_in_batches(frame_captioner, frames, batch_size))
            segments = [s for _, _, m in decoded if m.has_audio for s in m.audio] if audio_captioner is not None else []
            audio_captions = iter(_caption_in_batches(audio_captioner, segments, batch_size))
            for media_id, path, m in decoded:
                kind = (
                    "audio" if not m.has_visual else "image" if Path(path).suffix.lower() in IMAGE_SUFFIXES else "video"
                )
                record = {
                    "id": media_id,
                    kind: os.path.relpath(Path(path).absolute(), out_dir),
                    "visual_captions": [next(frame_captions) for _ in range(len(m.frames))] if m.has_visual else [],
                    "audio_captions": [next(audio_captions) for _ in range(len(m.audio))]
                    if m.has_audio and audio_captioner is not None
                    else [],
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[kind] += 1
                progress.update()
            out.flush()
    return counts
