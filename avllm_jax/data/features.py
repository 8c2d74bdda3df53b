"""Log-mel features of decoded audio: CLAP's (the input HTSAT takes) and Whisper's.

`clap_audio_features` computes what `transformers.ClapFeatureExtractor` computes (48 kHz,
64 mel bins, 1024-point Hann STFT, hop 480, power in dB), for a batch of K equal-length
segments in one vectorised pass:

- clips shorter than the window are padded ('repeatpad': tiled whole then zero-padded,
  'repeat': tiled and cut, 'pad': zero-padded);
- longer clips are cut: 'rand_trunc' takes one random window of the waveform (slaney mel
  filters, 1 channel); 'fusion' takes the mel of the whole clip, shrunk to the window
  length, plus three random window-long crops from its front, middle and back thirds
  (HTK mel filters, 4 channels). A 'fusion' clip that fits the window repeats its mel 4 times.

`is_longer` is True exactly for the clips that were cut. One deliberate difference from the
HF extractor: when no clip in a 'fusion' call is longer, HF marks one at random as longer
(a training-time trick of the original CLAP); here a clip's flag never depends on its batch.

`whisper_audio_features` computes what `transformers.WhisperFeatureExtractor` computes for one
clip (16 kHz, 400-point Hann STFT, hop 160, 80 or 128 slaney mel bins up to 8 kHz, log10 with
a floor, an 80 dB dynamic range, then (x + 4) / 4), over the 30 s window the Whisper encoder
takes: shorter clips are padded with silence, longer ones cut to their first 30 s.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_MEL_BINS = 64
FFT_SIZE = 1024
HOP_LENGTH = 480
MIN_FREQUENCY_HZ = 0.0
MAX_FREQUENCY_HZ = 14_000.0
POWER_FLOOR = 1e-10  # -100 dB
TRUNCATIONS = ("fusion", "rand_trunc")
PADDINGS = ("repeatpad", "repeat", "pad")


def clap_audio_features(
    waveforms: np.ndarray,
    *,
    truncation: str = "fusion",
    padding: str = "repeatpad",
    max_length_s: float = 10.0,
    sampling_rate: int = 48_000,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features of K mono segments for HTSAT.

    Args:
      waveforms: float [K, L] at `sampling_rate` (all segments the same length L).
      truncation: 'fusion' (4 channels) or 'rand_trunc' (1 channel), for clips longer than
        `max_length_s`; it also picks the mel filters (HTK for fusion, slaney otherwise).
      padding: 'repeatpad', 'repeat' or 'pad', for clips shorter than `max_length_s`.
      max_length_s: window length; the features have 1 + window_samples // 480 frames.
      rng: draws the random crops, one clip after the other (for 'fusion': front, middle,
        back). None uses a fresh unseeded generator, as HF's extractor does.
    Returns:
      features float32 [K, C, frames, 64] with C = 4 for 'fusion' and 1 otherwise (the
      layout of HF's `input_features`), and is_longer bool [K].
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r} is not one of {TRUNCATIONS}")
    if padding not in PADDINGS:
        raise ValueError(f"padding {padding!r} is not one of {PADDINGS}")
    if sampling_rate != 48_000:
        raise ValueError(f"CLAP features need 48 kHz audio; got sampling_rate={sampling_rate} (resample first)")
    waveforms = np.asarray(waveforms)
    if waveforms.ndim != 2 or waveforms.shape[1] == 0:
        raise ValueError(f"waveforms must be a non-empty [K, L] array, got shape {waveforms.shape}")
    waveforms = waveforms.astype(np.float64)
    num_clips, length = waveforms.shape
    window = int(round(max_length_s * sampling_rate))
    if window < FFT_SIZE:
        raise ValueError(f"max_length_s={max_length_s} is shorter than one {FFT_SIZE}-sample FFT window")
    rng = rng if rng is not None else np.random.default_rng()
    filters = _mel_filters(sampling_rate, "htk" if truncation == "fusion" else "slaney")
    is_longer = np.full(num_clips, length > window)

    if length <= window:
        mel = _log_mel(_pad(waveforms, window, padding), filters)[:, None]
    elif truncation == "rand_trunc":
        starts = [rng.integers(length - window + 1) for _ in range(num_clips)]
        cut = np.stack([w[s : s + window] for w, s in zip(waveforms, starts)])
        mel = _log_mel(cut, filters)[:, None]
    else:
        mel = _log_mel(waveforms, filters)
        chunk_frames = window // HOP_LENGTH + 1
        total_frames = mel.shape[1]
        if total_frames == chunk_frames:  # longer by less than one hop: the whole clip fits
            mel = mel[:, None]
            is_longer[:] = False
        else:
            shrunk = np.einsum("ot,ktf->kof", _bilinear_matrix(total_frames, chunk_frames), mel)
            crops = [_fusion_crops(clip_mel, chunk_frames, rng) for clip_mel in mel]
            mel = np.concatenate([shrunk[:, None], np.stack(crops)], axis=1)
    if truncation == "fusion" and mel.shape[1] == 1:
        mel = np.repeat(mel, 4, axis=1)
    return mel.astype(np.float32), is_longer


def _pad(waveforms: np.ndarray, window: int, padding: str) -> np.ndarray:
    length = waveforms.shape[1]
    if padding == "repeat":
        waveforms = np.tile(waveforms, (1, window // length + 1))[:, :window]
    elif padding == "repeatpad":
        waveforms = np.tile(waveforms, (1, window // length))
    return np.pad(waveforms, ((0, 0), (0, window - waveforms.shape[1])))


def _fusion_crops(mel: np.ndarray, chunk_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Three [chunk_frames, 64] crops whose starts fall in the front, middle and back thirds
    of the possible starts (the first start when a third is empty)."""
    thirds = np.array_split(np.arange(mel.shape[0] - chunk_frames + 1), 3)
    starts = [part[rng.integers(len(part))] if len(part) else 0 for part in thirds]
    return np.stack([mel[s : s + chunk_frames] for s in starts])


def _log_mel(waveforms: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """[K, L] float64 -> [K, 1 + L // hop, 64] power mel in dB (centred frames, reflect padding)."""
    padded = np.pad(waveforms, ((0, 0), (FFT_SIZE // 2, FFT_SIZE // 2)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, FFT_SIZE, axis=1)[:, ::HOP_LENGTH]
    power = np.abs(np.fft.rfft(frames * _hann_window(), axis=-1)) ** 2
    return 10.0 * np.log10(np.maximum(power @ filters, POWER_FLOOR))


@functools.cache
def _hann_window(size: int = FFT_SIZE) -> np.ndarray:
    """Periodic Hann window (as torch.hann_window and librosa use)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(size) / size)


def _hz_to_mel(hz, scale: str):
    hz = np.asarray(hz, np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    # slaney: linear below 1 kHz, logarithmic above
    log_step = np.log(6.4) / 27.0
    return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / log_step)


def _mel_to_hz(mel, scale: str):
    mel = np.asarray(mel, np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    log_step = np.log(6.4) / 27.0
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp(log_step * (mel - 15.0)))


@functools.cache
def _mel_filters(sampling_rate: int, scale: str) -> np.ndarray:
    """[FFT_SIZE // 2 + 1, 64] triangular filters. 'htk': HTK scale, peak 1 (torchaudio's
    default, used by CLAP's fusion models); 'slaney': slaney scale, area-normalised (librosa's)."""
    return _triangular_filters(sampling_rate, FFT_SIZE, NUM_MEL_BINS, MIN_FREQUENCY_HZ, MAX_FREQUENCY_HZ, scale)


@functools.cache
def _triangular_filters(
    sampling_rate: int, fft_size: int, num_bins: int, min_hz: float, max_hz: float, scale: str
) -> np.ndarray:
    """[fft_size // 2 + 1, num_bins] mel filters with edges evenly spaced in mel from min_hz to max_hz."""
    edges_mel = np.linspace(_hz_to_mel(min_hz, scale), _hz_to_mel(max_hz, scale), num_bins + 2)
    edges = _mel_to_hz(edges_mel, scale)
    bins = np.linspace(0, sampling_rate // 2, fft_size // 2 + 1)[:, None]
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    filters = np.maximum(0.0, np.minimum(rising, falling))
    if scale == "slaney":
        filters *= 2.0 / (upper - lower)
    return filters


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of 1-D linear resizing with half-pixel centres (torch's bilinear,
    align_corners=False), which is how CLAP shrinks a long clip's mel to the window.

    The source positions follow torch's float32 arithmetic (a float32 scale, one rounding of
    scale * (i + 0.5) - 0.5): in float64 the weights differ by up to 4e-6, i.e. 1e-3 dB."""
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    source = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
    source = np.maximum(source, 0.0).astype(np.float64)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    return matrix


WHISPER_SAMPLE_RATE = 16_000
WHISPER_FFT_SIZE = 400
WHISPER_HOP_LENGTH = 160
WHISPER_WINDOW_SAMPLES = 30 * WHISPER_SAMPLE_RATE  # the encoder takes exactly one 30 s window
WHISPER_FRAMES = WHISPER_WINDOW_SAMPLES // WHISPER_HOP_LENGTH  # 3000 mel frames
WHISPER_MEL_FRAMES_PER_ENCODER_FRAME = 2  # the stride of the encoder's second convolution
WHISPER_MAX_HZ = 8_000.0
WHISPER_LOG_FLOOR = 1e-10
WHISPER_DYNAMIC_RANGE = 8.0  # log10 units below the clip's peak, i.e. 80 dB


def whisper_audio_features(
    audio: np.ndarray, num_mel_bins: int = 80, *, sampling_rate: int = WHISPER_SAMPLE_RATE
) -> tuple[np.ndarray, int]:
    """Whisper log-mel features of one mono clip, and how many encoder frames hold real audio.

    Args:
      audio: float [L] at 16 kHz, L >= 1. Clips longer than 30 s are cut to their first 30 s.
      num_mel_bins: 80 (Whisper tiny ... large-v2) or 128 (large-v3).
    Returns:
      features float32 [num_mel_bins, 3000] (one row of HF's `input_features`), and
      valid_frames: the encoder frames (20 ms each, 1500 per window) centred on real audio,
      ceil(min(L, 480000) / 320), which WhisperEncoder.audio_embeddings pools over.
    """
    if sampling_rate != WHISPER_SAMPLE_RATE:
        raise ValueError(f"Whisper features need 16 kHz audio; got sampling_rate={sampling_rate} (resample first)")
    if num_mel_bins not in (80, 128):
        raise ValueError(f"Whisper checkpoints take 80 or 128 mel bins, not {num_mel_bins}")
    # HF reads the waveform as float32 first; the same rounding keeps float64 input in parity.
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio must be a non-empty mono [L] array, got shape {audio.shape}")
    real_samples = min(audio.size, WHISPER_WINDOW_SAMPLES)
    window = np.zeros(WHISPER_WINDOW_SAMPLES)
    window[:real_samples] = audio[:real_samples]
    half = WHISPER_FFT_SIZE // 2
    padded = np.pad(window, (half, half), mode="reflect")  # centred frames, as torch.stft
    # 3001 centred frames; Whisper drops the last, so a window is exactly 3000 frames
    frames = np.lib.stride_tricks.sliding_window_view(padded, WHISPER_FFT_SIZE)[::WHISPER_HOP_LENGTH][:WHISPER_FRAMES]
    power = np.abs(np.fft.rfft(frames * _hann_window(WHISPER_FFT_SIZE), axis=-1)) ** 2
    filters = _triangular_filters(WHISPER_SAMPLE_RATE, WHISPER_FFT_SIZE, num_mel_bins, 0.0, WHISPER_MAX_HZ, "slaney")
    log_mel = np.log10(np.maximum(power @ filters, WHISPER_LOG_FLOOR))
    log_mel = np.maximum(log_mel, log_mel.max() - WHISPER_DYNAMIC_RANGE)
    features = ((log_mel + 4.0) / 4.0).T.astype(np.float32)
    real_mel_frames = -(-real_samples // WHISPER_HOP_LENGTH)  # frames centred on a real sample
    valid_frames = -(-real_mel_frames // WHISPER_MEL_FRAMES_PER_ENCODER_FRAME)
    return features, int(valid_frames)


# The features a data config (pipeline.default_data_config) asks for, and whether an HTSAT takes them.


def audio_channels(config) -> int:
    return 4 if config.audio_truncation == "fusion" else 1


def audio_frames(config) -> int:
    return 1 + int(round(config.audio_max_length_s * config.audio_sample_rate)) // HOP_LENGTH


def longest_audio_window_s(max_frames: int, config) -> float:
    """The longest audio window, in seconds, whose spectrogram has at most `max_frames` frames."""
    return (max_frames - 1) * HOP_LENGTH / config.audio_sample_rate


def audio_settings_problem(config, encoder_config) -> str | None:
    """Why the audio settings of `config` do not suit the model's audio encoder, whose config's
    `kind` is 'htsat' (an HTSATConfig: fused or not, a spectrogram image of at most max_frames
    frames) or 'whisper' (a WhisperEncoderConfig: 16 kHz, its mel bins); None when they do."""
    kind = encoder_config.kind
    front_end = "whisper" if kind == "whisper" else "clap"
    if config.audio_front_end != front_end:
        return f"audio_front_end={config.audio_front_end!r} but the audio encoder is {kind!r}: use {front_end!r}"
    if kind == "whisper":
        if config.audio_sample_rate != WHISPER_SAMPLE_RATE:
            rate = WHISPER_SAMPLE_RATE
            return f"audio_sample_rate={config.audio_sample_rate} but Whisper takes {rate} Hz audio: use {rate}"
        if config.whisper_mel_bins != encoder_config.num_mel_bins:
            bins = encoder_config.num_mel_bins
            return f"whisper_mel_bins={config.whisper_mel_bins} but the Whisper encoder takes {bins}"
        return None
    fused_encoder, max_frames = encoder_config.enable_fusion, encoder_config.max_frames
    if (config.audio_truncation == "fusion") != fused_encoder:
        return (
            f"audio_truncation={config.audio_truncation!r} but the audio encoder is "
            f"{'fused' if fused_encoder else 'unfused'}; "
            f"use {'fusion' if fused_encoder else 'rand_trunc'!r}"
        )
    if (frames := audio_frames(config)) > max_frames:
        return (
            f"audio_max_length_s={config.audio_max_length_s:g} gives {frames} spectrogram frames and the audio "
            "encoder takes "
            f"at most {max_frames}: use a window of {longest_audio_window_s(max_frames, config):g} s or less"
        )
    return None
