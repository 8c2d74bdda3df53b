"""load_media time against FFmpeg's own single-threaded decode of the same file.

Writes two 720p H.264 + AAC clips with PyAV (kept in --workdir for later runs): 10 s with
the encoder's default keyframe spacing, and 120 s with a keyframe every 2 s as web video
has. For each it prints the best of --repeats runs of `ffmpeg -threads 1 -i FILE -f null -`
and of `load_media(FILE)`, and their ratio; the targets are <= 1.3 for the short clip and
<= 0.5 for the long one (sparse sampling skips the groups of pictures it does not need).
"""

import pathlib
import shutil
import subprocess
import tempfile

from benchmarks._timing import best_seconds

WIDTH, HEIGHT, FPS = 1280, 720, 30
CLIPS = {"10s_720p": (10, {}), "120s_720p_gop2s": (120, {"g": "60", "keyint_min": "60", "sc_threshold": "0"})}


def add_arguments(parser):
    parser.add_argument(
        "--workdir",
        default=str(pathlib.Path(tempfile.gettempdir()) / "avllm_loader_benchmark"),
        help="where the clips are written (reused when present)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is kept")
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)


def _frames(seconds):
    """Moving texture plus a sliding block, so that the encoder has real motion to code."""
    import numpy as np

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    for i in range(seconds * FPS):
        image = np.roll(texture, (i * 3, i * 5), axis=(0, 1))
        x = (i * 11) % (WIDTH - 200)
        image[200:400, x : x + 200] = (255, 64, 0)
        yield image


def _write_clip(path, seconds, options):
    import numpy as np

    from avllm_jax.data.media import write_media

    t = np.arange(seconds * 48000) / 48000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) / 2).astype(np.float32)
    print(f"writing {path} ...", flush=True)
    write_media(
        path,
        frames=_frames(seconds),
        fps=FPS,
        audio=audio,
        video_options={"preset": "veryfast", **options},
        audio_options={"aac_coder": "fast"},
    )


def run(args):
    from avllm_jax.data.media import load_media

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise SystemExit(
            "the loader benchmark compares with the ffmpeg command-line tool; install it (apt-get install ffmpeg)"
        )
    version = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout.splitlines()[0]
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{version}; load_media(num_frames={args.num_frames}, image_size={args.image_size}); best of {args.repeats}")
    for name, (seconds, options) in CLIPS.items():
        path = workdir / f"{name}.mp4"
        if not path.exists():
            _write_clip(path, seconds, options)
        command = [ffmpeg, "-v", "error", "-threads", "1", "-i", str(path), "-f", "null", "-"]
        ffmpeg_s = best_seconds(lambda: subprocess.run(command, check=True), args.repeats)
        media = None

        def load():
            nonlocal media
            media = load_media(path, num_frames=args.num_frames, image_size=args.image_size)

        load_s = best_seconds(load, args.repeats)
        print(
            f"{name:>16}: ffmpeg -threads 1 {ffmpeg_s:7.3f} s | load_media {load_s:7.3f} s | "
            f"ratio {load_s / ffmpeg_s:5.2f} | frames {media.frames.shape} audio {media.audio.shape}"
        )
