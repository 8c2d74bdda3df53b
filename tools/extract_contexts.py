r"""Captions the frames and audio of media files: the contexts that tools/curate_instructions.py reads.

    python tools/extract_contexts.py --media videos/ --out contexts.jsonl --device cuda

Frame captions come from an image-to-text model (--captioner, BLIP by default); audio captions
from CLAP zero-shot labels (--clap, --audio-labels) or from your own captioner
(--audio-captioner my_module:make_captioner: a function returning a callable that maps a list
of float32 audio segments to their captions; its `sample_rate` attribute, if any, sets the rate).
Rerunning the same command resumes: ids already in --out are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from avllm_jax.curation.contexts import (
    DEFAULT_AUDIO_LABELS,
    DEFAULT_CLAP,
    DEFAULT_FRAME_CAPTIONER,
    ClapLabeller,
    TransformersCaptioner,
    extract_contexts,
    find_media,
    read_labels,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--media", nargs="+", required=True, help="media files and/or directories (searched recursively)"
    )
    parser.add_argument("--out", required=True, help="context JSON lines (appended to; resumable)")
    parser.add_argument("--captioner", default=DEFAULT_FRAME_CAPTIONER, help="image-to-text model name or path")
    parser.add_argument("--caption-prompt", default=None, help='text each frame caption starts from, e.g. "a video of"')
    parser.add_argument("--clap", default=DEFAULT_CLAP, help="CLAP model name or path for zero-shot audio labels")
    parser.add_argument("--audio-labels", default=str(DEFAULT_AUDIO_LABELS), help="label list, one per line")
    parser.add_argument("--audio-template", default="The sound of {}.")
    parser.add_argument("--audio-captioner", default=None, help="MODULE:FUNCTION returning a custom audio captioner")
    parser.add_argument("--no-audio", action="store_true", help="caption frames only")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--num-audio-segments", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="frames (and audio segments) per model call")
    parser.add_argument("--decode-workers", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="torch device for the captioners, e.g. cuda")
    args = parser.parse_args(argv)

    media = find_media(args.media)
    frame_captioner = TransformersCaptioner(args.captioner, device=args.device, prompt=args.caption_prompt)
    if args.no_audio:
        audio_captioner = None
    elif args.audio_captioner:
        module, _, function = args.audio_captioner.partition(":")
        audio_captioner = getattr(importlib.import_module(module), function)()
    else:
        audio_captioner = ClapLabeller(
            read_labels(args.audio_labels), args.clap, template=args.audio_template, device=args.device
        )
    counts = extract_contexts(
        media,
        args.out,
        frame_captioner,
        audio_captioner,
        num_frames=args.num_frames,
        image_size=frame_captioner.image_size,
        num_audio_segments=args.num_audio_segments,
        sample_rate=getattr(audio_captioner, "sample_rate", 48000),
        batch_size=args.batch_size,
        decode_workers=args.decode_workers,
    )
    print(", ".join(f"{key}: {value}" for key, value in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
