"""load_media on files written here with PyAV: every container/codec, stills, odd geometry, bad files."""

import struct

import av
import numpy as np
import pytest

from avllm_jax.data.media import MediaError, load_media, write_media

SIZE = 32
STEP = 24  # grey level step between consecutive source frames; identifies which frame was sampled


def ramp_frames(num_frames, height=48, width=64):
    """Frame i is flat grey at level STEP * i."""
    return np.stack([np.full((height, width, 3), STEP * i, np.uint8) for i in range(num_frames)])


def sine(seconds, sample_rate, frequency=440.0, channels=1):
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return np.tile(0.5 * np.sin(2 * np.pi * frequency * t, dtype=np.float32), (channels, 1)).astype(np.float32)


def peak_frequency(audio, sample_rate=48000):
    signal = audio.reshape(-1)
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(signal.size)))
    return np.argmax(spectrum) * sample_rate / signal.size


def expected_indices(num_source, fps, num_frames):
    """The source frame on screen at the centre of each of `num_frames` equal intervals."""
    duration = num_source / fps
    return [int((j + 0.5) * duration / num_frames * fps) for j in range(num_frames)]


VIDEO_FORMATS = [
    # suffix, video codec, pixel format, audio codec (None: silent), audio sample rate
    (".mp4", "libx264", "yuv420p", "aac", 48000),
    (".mp4", "mpeg4", "yuv420p", "libmp3lame", 44100),
    (".mkv", "libx264", "yuv420p", "flac", 16000),
    (".webm", "libvpx-vp9", "yuv420p", "libopus", 48000),
    (".avi", "mpeg4", "yuv420p", "pcm_s16le", 22050),
    (".mov", "libx264", "yuv420p", "aac", 44100),
    (".gif", "gif", "rgb8", None, None),
    (".mp4", "libx264", "yuv420p", None, None),
]


@pytest.mark.parametrize("suffix,video_codec,pix_fmt,audio_codec,sample_rate", VIDEO_FORMATS)
def test_video_formats(tmp_path, suffix, video_codec, pix_fmt, audio_codec, sample_rate):
    path = tmp_path / f"clip{suffix}"
    audio = sine(1.25, sample_rate) if audio_codec else None
    write_media(
        path,
        frames=ramp_frames(10),
        fps=8,
        audio=audio,
        sample_rate=sample_rate or 48000,
        video_codec=video_codec,
        pix_fmt=pix_fmt,
        audio_codec=audio_codec or "aac",
    )
    media = load_media(path, num_frames=8, image_size=SIZE, num_audio_segments=4)

    assert media.has_visual and media.frames.dtype == np.uint8 and media.frames.shape == (8, SIZE, SIZE, 3)
    sampled = np.round(media.frames.reshape(8, -1).mean(axis=1) / STEP).astype(int).tolist()
    assert sampled == expected_indices(10, 8, 8)
    assert media.duration_s == pytest.approx(1.25, abs=0.15)
    if audio_codec is None:
        assert not media.has_audio and media.audio is None
    else:
        assert media.has_audio and media.audio.dtype == np.float32 and media.audio.shape[0] == 4
        assert media.audio.size / 48000 == pytest.approx(1.25, abs=0.1)  # resampled to 48 kHz
        assert peak_frequency(media.audio) == pytest.approx(440, abs=8)


AUDIO_FORMATS = [
    (".mp3", "libmp3lame", 44100),
    (".flac", "flac", 16000),
    (".wav", "pcm_s16le", 48000),
    (".opus", "libopus", 48000),
    (".m4a", "aac", 22050),
]


@pytest.mark.parametrize("suffix,codec,sample_rate", AUDIO_FORMATS)
def test_audio_only_formats(tmp_path, suffix, codec, sample_rate):
    path = tmp_path / f"sound{suffix}"
    write_media(path, audio=sine(1.0, sample_rate, frequency=1000.0), sample_rate=sample_rate, audio_codec=codec)
    media = load_media(path, num_audio_segments=3)
    assert not media.has_visual and media.frames is None
    assert media.has_audio and media.audio.shape[0] == 3 and media.audio.dtype == np.float32
    assert media.audio.size / 48000 == pytest.approx(1.0, abs=0.1)
    assert media.duration_s == pytest.approx(1.0, abs=0.1)
    assert peak_frequency(media.audio) == pytest.approx(1000, abs=8)


@pytest.mark.parametrize("suffix,codec,pix_fmt", [(".png", "png", "rgb24"), (".jpg", "mjpeg", "yuvj420p")])
def test_stills_give_one_frame(tmp_path, suffix, codec, pix_fmt):
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :, 1] = 200
    path = tmp_path / f"still{suffix}"
    write_media(path, frames=image[None], video_codec=codec, pix_fmt=pix_fmt, container_format="image2")
    media = load_media(path, num_frames=8, image_size=SIZE)
    assert media.frames.shape == (1, SIZE, SIZE, 3) and not media.has_audio and media.duration_s == 0.0
    assert np.abs(media.frames.astype(int) - [0, 200, 0]).max() <= 6


def test_short_video_repeats_frames(tmp_path):
    path = tmp_path / "short.mp4"
    write_media(path, frames=ramp_frames(3), fps=8)
    media = load_media(path, num_frames=8, image_size=SIZE)
    sampled = np.round(media.frames.reshape(8, -1).mean(axis=1) / STEP).astype(int).tolist()
    assert sampled == expected_indices(3, 8, 8) and sorted(set(sampled)) == [0, 1, 2]


def test_long_video_with_sparse_sampling_picks_the_right_frames(tmp_path):
    # 120 frames, a keyframe every 8: most GOPs hold no sampled frame and are never decoded.
    step = 2
    frames = np.stack([np.full((48, 64, 3), step * i, np.uint8) for i in range(120)])
    path = tmp_path / "long.mp4"
    write_media(path, frames=frames, fps=8, video_options={"g": "8", "bf": "2"})
    media = load_media(path, num_frames=5, image_size=SIZE)
    sampled = (media.frames.reshape(5, -1).mean(axis=1) / step).tolist()
    assert np.allclose(sampled, expected_indices(120, 8, 5), atol=0.5)


def two_colour_frames(height, width, vertical_split):
    """Red on the left (top) half, blue on the right (bottom) half."""
    image = np.zeros((height, width, 3), np.uint8)
    if vertical_split:
        image[:, : width // 2, 0], image[:, width // 2 :, 2] = 255, 255
    else:
        image[: height // 2, :, 0], image[height // 2 :, :, 2] = 255, 255
    return np.stack([image] * 4)


def assert_red_top_blue_bottom(frames):
    top, bottom = frames[0, 2].astype(int), frames[0, -3].astype(int)
    assert (top[:, 0] > 200).all() and (top[:, 2] < 50).all()
    assert (bottom[:, 2] > 200).all() and (bottom[:, 0] < 50).all()


def test_portrait_video_is_resized_on_the_short_side(tmp_path):
    path = tmp_path / "portrait.mp4"
    write_media(path, frames=two_colour_frames(112, 64, vertical_split=False))
    media = load_media(path, num_frames=2, image_size=SIZE)
    assert media.frames.shape == (2, SIZE, SIZE, 3)
    assert_red_top_blue_bottom(media.frames)  # the centre crop of a portrait keeps both halves


def test_odd_size_video(tmp_path):
    path = tmp_path / "odd.webm"
    write_media(path, frames=ramp_frames(6, height=75, width=101), video_codec="libvpx-vp9")
    media = load_media(path, num_frames=4, image_size=SIZE)
    assert media.frames.shape == (4, SIZE, SIZE, 3)


def test_rotation_metadata_is_honoured(tmp_path):
    # A landscape clip, red left and blue right, tagged "rotate 90° clockwise" in the mp4 track header.
    path = tmp_path / "rotated.mp4"
    write_media(path, frames=two_colour_frames(64, 96, vertical_split=True))
    data = bytearray(path.read_bytes())
    tkhd = data.find(b"tkhd")
    assert data[tkhd + 4] == 0  # version 0 layout below
    matrix = tkhd + 4 + 4 + 5 * 4 + 8 + 4 * 2
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    media = load_media(path, num_frames=2, image_size=SIZE)
    assert_red_top_blue_bottom(media.frames)  # left went to the top


def test_surround_audio_is_downmixed(tmp_path):
    path = tmp_path / "surround.mp4"
    write_media(path, frames=ramp_frames(8), audio=sine(1.0, 48000, frequency=600.0, channels=6), audio_layout="5.1")
    media = load_media(path, num_frames=4, image_size=SIZE, num_audio_segments=4)
    assert media.audio.ndim == 2 and media.audio.shape[0] == 4
    assert peak_frequency(media.audio) == pytest.approx(600, abs=8)
    assert np.abs(media.audio).max() > 0.1


def test_audio_shorter_than_video(tmp_path):
    path = tmp_path / "short_audio.mkv"
    write_media(path, frames=ramp_frames(10), fps=5, audio=sine(0.5, 48000), audio_codec="flac")
    media = load_media(path, num_frames=4, image_size=SIZE, num_audio_segments=4)
    assert media.has_visual and media.has_audio
    assert media.audio.size / 48000 == pytest.approx(0.5, abs=0.05)
    assert media.duration_s == pytest.approx(2.0, abs=0.15)


def _write_bad(tmp_path, name):
    good = tmp_path / "good.mkv"
    write_media(good, frames=ramp_frames(10), fps=3, audio=sine(3.0, 48000), audio_codec="flac")
    bad = tmp_path / name
    if name == "empty.mp4":
        bad.write_bytes(b"")
    elif name == "noise.mp4":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif name == "notes.txt":
        bad.write_text("These are notes, not a video.\n" * 20)
    elif name == "truncated.mkv":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    elif name == "truncated.flac":
        flac = tmp_path / "good.flac"
        write_media(flac, audio=sine(3.0, 48000), audio_codec="flac")
        bad.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    elif name == "truncated.mp4":
        mp4 = tmp_path / "good.mp4"
        write_media(mp4, frames=ramp_frames(10), fps=3)
        bad.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    elif name == "zero_frames.mkv":  # a video stream's header and not one frame
        with av.open(str(bad), "w") as container:
            stream = container.add_stream("ffv1", rate=3)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            container.start_encoding()
    elif name == "unknown_codec.mp4":  # H.264 with its codec tags renamed: no decoder claims it
        mp4 = tmp_path / "good.mp4"
        write_media(mp4, frames=ramp_frames(10), fps=3)
        bad.write_bytes(mp4.read_bytes().replace(b"avc1", b"zzz1").replace(b"avcC", b"zzzC"))
    return bad


@pytest.mark.parametrize(
    "name",
    [
        "empty.mp4",
        "noise.mp4",
        "notes.txt",
        "truncated.mkv",
        "truncated.flac",
        "truncated.mp4",
        "missing.mp4",
        "zero_frames.mkv",
        "unknown_codec.mp4",
    ],
)
def test_unreadable_files_raise_media_error_naming_the_file(tmp_path, name):
    bad = _write_bad(tmp_path, name)
    with pytest.raises(MediaError, match=name.replace(".", r"\.")) as error:
        load_media(bad, num_frames=4, image_size=SIZE)
    assert isinstance(error.value, ValueError)


def test_zero_length_audio_counts_as_no_audio(tmp_path):
    """An audio stream without a sample: the file loads with neither stream, which the
    pipeline skips as bad media and chat refuses (no stream to use)."""
    path = tmp_path / "silence.flac"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("flac", rate=48000)
        stream.layout = "mono"
        container.start_encoding()
    media = load_media(path, num_frames=4, image_size=SIZE)
    assert not media.has_audio and not media.has_visual
