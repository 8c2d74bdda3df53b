"""Decoding video, audio and still images with PyAV (FFmpeg) into model-ready arrays, and
(`write_media`) encoding arrays into media files for the demo set, the tests and benchmarks.

`load_media` reads any container and codec FFmpeg reads, in one pass over the file:
audio packets are all decoded; video packets are buffered one group of pictures (GOP,
keyframe to keyframe) at a time and a GOP is decoded only when one of the sampled frame
times falls inside it, and only up to that frame. A short clip therefore costs about one
full decode, and a long one with frequent keyframes costs a fraction of it, without relying
on the container's seek index (which webm, avi and streamed files may lack).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from avllm_jax.errors import AvllmError

# Demuxers that open almost any file (ANSI art, raw binary) and would turn text into "video".
_TEXT_ART_FORMATS = frozenset({"tty", "bin", "xbin", "adf", "idf"})
# A file whose streams end this much before the duration its header declares was cut short.
# Only demuxers that read the duration from a header qualify: mp3, ADTS and MPEG-TS durations
# are guesses from the bit rate and would flag good files (and FFmpeg fits a WAV's to its size).
_TRUNCATION_TOLERANCE_S = 0.5
_HEADER_DURATION_FORMATS = frozenset({"matroska,webm", "mov,mp4,m4a,3gp,3g2,mj2", "avi", "flac"})


class MediaError(AvllmError, ValueError):
    """A media file that cannot be decoded; the message names the file and the reason."""


@dataclasses.dataclass
class Media:
    """Decoded media: `frames` uint8 [T, S, S, 3] (T = 1 for a still), `audio` float32 [K, L] mono."""

    frames: np.ndarray | None
    audio: np.ndarray | None
    duration_s: float

    @property
    def has_visual(self) -> bool:
        return self.frames is not None

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    @property
    def is_still(self) -> bool:
        return self.frames is not None and self.frames.shape[0] == 1


def load_media(
    path: str | os.PathLike,
    *,
    num_frames: int = 32,
    image_size: int = 224,
    num_audio_segments: int = 4,
    audio_sample_rate: int = 48000,
) -> Media:
    """Decodes `path` into uniformly sampled frames and K equal consecutive mono audio segments.

    Frames are taken at the centres of `num_frames` equal intervals of the video (a video
    with fewer frames repeats them), resized on the short side with bicubic filtering,
    centre-cropped to `image_size` and turned upright per the rotation metadata. Audio is
    downmixed to mono and resampled to `audio_sample_rate`; an audio stream with fewer
    samples than segments counts as no audio. Raises MediaError for any unreadable file.
    """
    path = os.fspath(path)
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(f"{path}: cannot open as media ({e})") from e
    try:
        with container:
            return _decode(container, path, num_frames, image_size, num_audio_segments, audio_sample_rate)
    except av.FFmpegError as e:
        raise MediaError(f"{path}: decoding failed ({e})") from e


def _decode(container, path, num_frames, image_size, num_audio_segments, audio_sample_rate) -> Media:
    if container.format.name in _TEXT_ART_FORMATS:
        raise MediaError(f"{path}: not a media file (FFmpeg reads it only as {container.format.name!r} text art)")
    video = next((s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic), None)
    audio = container.streams.audio[0] if container.streams.audio else None
    if video is None and audio is None:
        raise MediaError(f"{path}: no video or audio stream")
    is_still = video is not None and (container.format.name == "image2" or container.format.name.endswith("_pipe"))
    if is_still:
        frame = next(container.decode(video), None)
        if frame is None:
            raise MediaError(f"{path}: image holds no decodable picture")
        return Media(frames=_to_rgb(frame, image_size)[None], audio=None, duration_s=0.0)

    declared_s = container.duration / av.time_base if container.duration else None
    container_start_s = container.start_time / av.time_base if container.start_time else 0.0
    video_start, video_duration = _stream_span(video) if video is not None else (0.0, None)
    if video is not None and video_duration is None:
        video_duration = declared_s or _scan_video_duration(path, video.index)
    sampler = _FrameSampler(num_frames, video_start, video_duration, image_size) if video is not None else None
    resampler = av.AudioResampler(format="flt", layout="mono", rate=audio_sample_rate) if audio else None
    audio_chunks = []
    gop: list[av.Packet] = []
    stream_end_s = 0.0  # where the last packet of any stream ends, to detect truncated files

    def take_audio(frames):
        assert (
            resampler is not None
        )  # only audio packets reach here, and the resampler is created with the audio stream
        for f in frames:
            audio_chunks.extend(r.to_ndarray()[0] for r in resampler.resample(f))

    streams = [s for s in (video, audio) if s is not None]
    for stream in streams:
        if stream.codec_context is None:  # a codec this FFmpeg build cannot decode
            raise MediaError(f"{path}: no decoder for its {stream.type} stream (an unknown or unsupported codec)")
        stream.codec_context.thread_count = 1  # parallelism comes from the pipeline's worker processes
    for packet in container.demux(streams):
        if packet.pts is not None and packet.time_base is not None:
            stream_end_s = max(stream_end_s, float((packet.pts + (packet.duration or 0)) * packet.time_base))
        if packet.stream is audio:
            take_audio(audio.codec_context.decode(packet) if packet.size else ())
        elif packet.size:
            if packet.is_keyframe and gop:
                assert sampler is not None  # a packet not from the audio stream is from the video stream
                sampler.decode_gop(gop, end_s=_packet_time(packet, video_start))
                gop = []
            gop.append(packet)
    if audio is not None:
        assert resampler is not None  # created with the audio stream
        take_audio(audio.codec_context.decode(None))
        audio_chunks.extend(r.to_ndarray()[0] for r in resampler.resample(None))
    if sampler is not None:
        sampler.decode_gop(gop, end_s=float("inf"))
        sampler.finish()

    stream_end_s -= container_start_s
    if (
        container.format.name in _HEADER_DURATION_FORMATS
        and declared_s is not None
        and stream_end_s < declared_s - _TRUNCATION_TOLERANCE_S
    ):
        raise MediaError(f"{path}: truncated: streams end at {stream_end_s:.2f} s of a declared {declared_s:.2f} s")
    frames = None
    if sampler is not None:
        if not sampler.has_frames:
            raise MediaError(f"{path}: video stream holds no decodable frames")
        frames = sampler.frames()
    waveform = np.concatenate(audio_chunks) if audio_chunks else np.zeros(0, np.float32)
    segments = None
    if waveform.size >= num_audio_segments:
        length = waveform.size // num_audio_segments
        segments = waveform[: length * num_audio_segments].reshape(num_audio_segments, length)
    duration_s = max(video_duration or 0.0, waveform.size / audio_sample_rate)
    return Media(frames=frames, audio=segments, duration_s=float(duration_s))


def _stream_span(stream) -> tuple[float, float | None]:
    """(start, duration) of a stream in seconds; duration None when the container does not say."""
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    duration = float(stream.duration * tb) if stream.duration else None
    return start, duration


def _packet_time(packet, start_s: float) -> float:
    return float(packet.pts * packet.time_base) - start_s if packet.pts is not None else float("inf")


def _scan_video_duration(path, stream_index) -> float:
    """Duration from the packets themselves, for containers that declare none (a demux pass, no decoding)."""
    with av.open(path) as container:
        stream = container.streams[stream_index]
        start, _ = _stream_span(stream)
        ends = [
            float((p.pts + (p.duration or 0)) * p.time_base) - start
            for p in container.demux(stream)
            if p.pts is not None
        ]
    return max(ends, default=0.0)


class _FrameSampler:
    """Picks, for each target time, the frame on screen then (the last frame starting at or before it).

    Fed one GOP of packets at a time: a GOP that ends before the next unresolved target is
    never decoded, and a decoded GOP stops as soon as its targets are resolved.
    """

    def __init__(self, num_frames, start_s, duration_s, image_size):
        self.targets = [(i + 0.5) * (duration_s or 0.0) / num_frames for i in range(num_frames)]
        self.chosen: list[np.ndarray] = []
        self.start_s = start_s
        self.image_size = image_size
        # One reformatter per file: it keeps its scaler between frames (50x faster on small frames).
        self.reformatter = VideoReformatter()
        self.previous = None  # last decoded frame, (av.VideoFrame, cached rgb array or None)
        self.decoder_dirty = False  # the decoder holds state from a GOP we stopped decoding
        self.codec_context = None
        self.time_base = None

    @property
    def has_frames(self) -> bool:
        return self.previous is not None

    def decode_gop(self, packets, end_s):
        if not packets or len(self.chosen) == len(self.targets) or self.targets[len(self.chosen)] >= end_s:
            return
        codec_context = packets[0].stream.codec_context
        self.codec_context = codec_context
        self.time_base = packets[0].stream.time_base
        if self.decoder_dirty:
            codec_context.flush_buffers()
            self.decoder_dirty = False
        for packet in packets:
            self._take(codec_context.decode(packet))
            if len(self.chosen) == len(self.targets) or self.targets[len(self.chosen)] >= end_s:
                # Targets of this GOP are resolved; drain the frames still buffered for reordering.
                self._drain()
                return

    def finish(self):
        self._drain()
        while self.previous is not None and len(self.chosen) < len(self.targets):
            self.chosen.append(self._previous_rgb())

    def frames(self) -> np.ndarray:
        return np.stack(self.chosen)

    def _drain(self):
        if self.codec_context is not None and not self.decoder_dirty:
            self._take(self.codec_context.decode(None))
            self.decoder_dirty = True

    def _take(self, frames):
        for frame in frames:
            if frame.pts is None:
                continue
            time_s = float(frame.pts * self.time_base) - self.start_s
            while len(self.chosen) < len(self.targets) and self.targets[len(self.chosen)] < time_s:
                # The target lies before this frame: the previous frame was on screen (or, before
                # the first frame, this one is the nearest).
                self.chosen.append(
                    self._previous_rgb()
                    if self.previous is not None
                    else _to_rgb(frame, self.image_size, self.reformatter)
                )
            self.previous = [frame, None]

    def _previous_rgb(self):
        if self.previous[1] is None:
            self.previous[1] = _to_rgb(self.previous[0], self.image_size, self.reformatter)
        return self.previous[1]


def _to_rgb(frame: av.VideoFrame, size: int, reformatter: VideoReformatter | None = None) -> np.ndarray:
    """CLIP-style: bicubic resize of the short side to `size`, centre crop, upright per rotation metadata."""
    rotation = int(round(frame.rotation or 0)) % 360  # counter-clockwise degrees to display upright
    turned = rotation in (90, 270)
    display_w, display_h = (frame.height, frame.width) if turned else (frame.width, frame.height)
    scale = size / min(display_w, display_h)
    new_w, new_h = max(size, round(display_w * scale)), max(size, round(display_h * scale))
    if turned:
        new_w, new_h = new_h, new_w
    reformatter = reformatter or VideoReformatter()
    rgb = reformatter.reformat(frame, width=new_w, height=new_h, format="rgb24", interpolation="BICUBIC").to_ndarray()
    if rotation:
        rgb = np.rot90(rgb, k=rotation // 90)
    top = (rgb.shape[0] - size) // 2
    left = (rgb.shape[1] - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


def write_media(
    path: str | os.PathLike,
    *,
    frames: Iterable[np.ndarray] | None = None,
    fps: int = 8,
    audio: np.ndarray | None = None,
    sample_rate: int = 48000,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    pix_fmt: str = "yuv420p",
    audio_layout: str = "mono",
    container_format: str | None = None,
    video_options: dict[str, str] | None = None,
    audio_options: dict[str, str] | None = None,
) -> None:
    """Encodes uint8 RGB `frames` (an array [T, H, W, 3] or any iterable of [H, W, 3]) and/or
    float32 `audio` [channels, n] (or [n]) with PyAV.

    The container comes from the file name unless `container_format` is given (e.g. "image2"
    with one frame for a still). Used by the demo set, the tests and the loader benchmark.
    """
    planar = None if audio is None else np.ascontiguousarray(np.atleast_2d(audio), dtype=np.float32)
    with av.open(os.fspath(path), "w", format=container_format) as container:
        video_stream: av.VideoStream | None = None
        audio_stream: av.AudioStream | None = None
        if frames is not None:
            frames = iter(frames)
            first = next(frames)
            frames = itertools.chain([first], frames)
            stream = container.add_stream(video_codec, rate=fps, options=video_options or {})
            if not isinstance(stream, av.VideoStream):
                raise ValueError(f"video_codec {video_codec!r} is not a video codec")
            video_stream = stream
            video_stream.height, video_stream.width = first.shape[:2]
            video_stream.pix_fmt = pix_fmt
        if planar is not None:
            stream = container.add_stream(
                audio_codec, rate=sample_rate, layout=audio_layout, options=audio_options or {}
            )
            if not isinstance(stream, av.AudioStream):
                raise ValueError(f"audio_codec {audio_codec!r} is not an audio codec")
            audio_stream = stream

        def encode_audio(start, stop):
            if audio_stream is not None and stop > start:
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(planar[:, start:stop]), format="fltp", layout=audio_layout
                )
                frame.sample_rate, frame.pts = sample_rate, start
                container.mux(audio_stream.encode(frame))

        audio_done = 0  # interleave: each video frame is followed by its share of the audio
        for index, image in enumerate(frames or ()):
            assert video_stream is not None  # added above whenever frames are given
            container.mux(video_stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            if planar is not None:
                stop = min(planar.shape[1], round((index + 1) * sample_rate / fps))
                encode_audio(audio_done, stop)
                audio_done = max(audio_done, stop)
        if planar is not None:
            assert audio_stream is not None  # added above whenever audio is given
            encode_audio(audio_done, planar.shape[1])
            container.mux(audio_stream.encode())
        if video_stream is not None:
            container.mux(video_stream.encode())
