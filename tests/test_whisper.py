"""Whisper: the log-mel front end against transformers.WhisperFeatureExtractor, the encoder
against transformers' WhisperModel encoder on random weights read through the converter
(save_pretrained -> safetensors -> convert_whisper -> load_into), the segment pooling, the
converter's errors, and a converted model's audio part (and the layout before it was one). Float32.

Tolerances: features 1e-4 absolute against the extractor (the normalised log-mel is O(1), max
|HF| ~ 1.4; HF's torch path computes in float32, we in float64) and 1e-6 against its numpy path;
hidden states max |ours - HF| <= 1e-4 * max |HF|. HF initialises
biases at 0, norms at 1 and the position table at exact sinusoids, so every float tensor is
re-drawn before saving (the table perturbed): a mapping mistake, or recomputing the table
instead of reading it, would fail.
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from hf_reference import assert_parity, build_hf

import avllm_jax
from avllm_jax import checkpoint, convert, train
from avllm_jax.data.features import whisper_audio_features
from avllm_jax.models import conversion, whisper
from avllm_jax.training import checkpointing
from avllm_jax.training import config as config_lib

SR = 16_000
FEATURE_TOLERANCE = 1e-4  # absolute, on the normalised log-mel
TOLERANCE = 1e-4  # relative to max |HF|
# A decoder as small as WhisperConfig allows: the converter must drop it whatever its size.
SMALL_DECODER = dict(
    decoder_layers=1,
    decoder_ffn_dim=16,
    vocab_size=100,
    max_target_positions=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)
ENCODERS = {
    # Whisper-Tiny's encoder at full size (1500 positions; about 2 s a forward on CPU)
    "tiny": (
        dict(
            d_model=384,
            encoder_layers=4,
            encoder_attention_heads=6,
            decoder_attention_heads=6,
            encoder_ffn_dim=1536,
            num_mel_bins=80,
        ),
        transformers.WhisperModel,
    ),
    # an odd shape: head width 12, an FFN that is not 4x, 128 mel bins as in large-v3, and the
    # `model.encoder.` names of WhisperForConditionalGeneration
    "odd": (
        dict(
            d_model=36,
            encoder_layers=2,
            encoder_attention_heads=3,
            decoder_attention_heads=3,
            encoder_ffn_dim=52,
            num_mel_bins=128,
        ),
        transformers.WhisperForConditionalGeneration,
    ),
}


def _clip(seconds, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * SR))) / SR
    chirp = np.sin(2 * np.pi * (200 + 150 * seed + 100 * t) * t)
    return (0.3 * chirp + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("num_mel_bins", [80, 128])
@pytest.mark.parametrize("seconds", [3.3, 30.0, 41.0], ids=["short", "30s", "longer"])
def test_features_match_hf(seconds, num_mel_bins):
    audio = _clip(seconds)
    ours, valid_frames = whisper_audio_features(audio, num_mel_bins)
    extractor = transformers.WhisperFeatureExtractor(feature_size=num_mel_bins)
    reference = extractor(audio, sampling_rate=SR, return_tensors="np", return_attention_mask=True)
    hf = reference["input_features"][0]
    assert ours.dtype == np.float32 and ours.shape == hf.shape == (num_mel_bins, 3000)
    error = float(np.abs(ours - hf).max())
    print(
        f"PARITY whisper features {seconds:g} s, {num_mel_bins} mel: max|diff|={error:.3e} "
        f"max|HF|={np.abs(hf).max():.3e}"
    )
    assert error <= FEATURE_TOLERANCE
    # HF's numpy path (float64 STFT, as ours) agrees to float32 rounding; its torch path, the
    # one called above, is float32 throughout and differs from its own numpy path by ~5e-5
    window = np.pad(audio[: 30 * SR], (0, max(0, 30 * SR - audio.size)))[None]
    numpy_path = extractor._np_extract_fbank_features(window, "cpu")[0]
    np.testing.assert_allclose(ours, numpy_path, atol=1e-6)
    # HF's mel-frame mask through the encoder's length formula (WhisperModel._get_feat_extract_output_lengths)
    real_mel_frames = int(reference["attention_mask"].sum())
    assert valid_frames == (real_mel_frames - 1) // 2 + 1 == min(1500, -(-audio.size // 320))


def test_clip_longer_than_30s_is_cut_to_its_first_30s():
    audio = _clip(41.0)
    features, valid_frames = whisper_audio_features(audio)
    first_30s, valid_30s = whisper_audio_features(audio[: 30 * SR])
    np.testing.assert_array_equal(features, first_30s)
    assert valid_frames == valid_30s == 1500
    assert whisper_audio_features(audio[:321])[1] == 2  # 321 samples reach into a second 20 ms frame


def test_bad_audio_is_rejected():
    with pytest.raises(ValueError, match="16 kHz"):
        whisper_audio_features(_clip(1.0), sampling_rate=48_000)
    with pytest.raises(ValueError, match="mono"):
        whisper_audio_features(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        whisper_audio_features(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="80 or 128"):
        whisper_audio_features(_clip(1.0), 64)


def _randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            noise = torch.randn(tensor.shape, generator=generator)
            if "embed_positions" in name:
                tensor.add_(0.1 * noise)
            elif tensor.ndim == 1 and name.endswith("weight"):  # norm scales
                tensor.copy_(1.0 + 0.2 * noise)
            elif tensor.ndim == 1:
                tensor.copy_(0.1 * noise)
            else:  # fan-in scaled (conv kernels [out, in, 3] too)
                tensor.copy_(noise * tensor[0].numel() ** -0.5)


def _save_hf(name, directory):
    fields, model_class = ENCODERS[name]
    model = build_hf(model_class, transformers.WhisperConfig(**fields, **SMALL_DECODER))
    _randomize(model)
    model.save_pretrained(directory)
    return model.get_encoder()


def _convert(directory):
    config, flat = convert.convert_whisper(str(directory))
    model = nnx.eval_shape(lambda: whisper.WhisperEncoder(config, rngs=nnx.Rngs(0)))
    conversion.load_into(model, flat)
    return model


def _pool_by_hand(hidden, num_segments, valid_frames):
    out = np.zeros((hidden.shape[0], num_segments, hidden.shape[2]), np.float64)
    for b, valid in enumerate(valid_frames):
        for k in range(num_segments):
            start = k * valid // num_segments
            out[b, k] = hidden[b, start : max((k + 1) * valid // num_segments, start + 1)].mean(axis=0)
    return out


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_matches_hf(name, tmp_path):
    hf_encoder = _save_hf(name, tmp_path).eval()
    model = _convert(tmp_path)
    if name == "tiny":
        assert model.config == whisper.PRESETS["whisper_tiny"]
    mel = model.config.num_mel_bins
    (features_a, valid_a), (features_b, valid_b) = (
        whisper_audio_features(_clip(4.1, 1), mel),
        whisper_audio_features(_clip(12.5, 2), mel),
    )
    features, valid_frames = np.stack([features_a, features_b]), np.array([valid_a, valid_b])
    with torch.no_grad():
        reference = hf_encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    forward = nnx.jit(lambda m, x, valid: (m(x), m.audio_embeddings(x, valid, num_segments=5)))
    hidden, segments = jax.device_get(forward(model, features, valid_frames))
    assert hidden.shape == reference.shape == (2, 1500, model.config.d_model)
    assert_parity(hidden, reference, f"whisper encoder {name} last hidden state", TOLERANCE)
    assert_parity(
        segments, _pool_by_hand(reference, 5, valid_frames), f"whisper {name} 5 segment embeddings", TOLERANCE
    )
    # the two clips differ by far more than the tolerance, so mixing up the batch would fail
    assert np.abs(reference[0] - reference[1]).max() > 10 * TOLERANCE * np.abs(reference).max()


def test_segment_pooling_by_hand():
    """hidden[b, t, d] = t * (d + 1): a span's mean is its mean frame index times (d + 1)."""
    frames, width = 12, 3
    hidden = np.arange(frames, dtype=np.float32)[None, :, None] * np.arange(1, width + 1, dtype=np.float32)
    hidden = np.repeat(hidden, 4, axis=0)
    valid_frames = np.array([10, 3, 2000, 0])
    pooled = np.asarray(whisper.segment_embeddings(hidden, 4, valid_frames))
    mean_index = np.array(
        [
            [0.5, 3.0, 5.5, 8.0],  # 10 frames: spans [0,2) [2,5) [5,7) [7,10)
            [0.0, 0.0, 1.0, 2.0],  # 3 frames, 4 segments: [0,1) [0,1) [1,2) [2,3), each its starting frame
            [1.0, 4.0, 7.0, 10.0],  # more than the 12 frames there are: all 12, in spans of 3
            [0.0, 0.0, 0.0, 0.0],  # none: the first frame, so nothing divides by zero
        ]
    )
    np.testing.assert_allclose(pooled, mean_index[..., None] * np.arange(1, width + 1), rtol=1e-6)
    with pytest.raises(ValueError, match="num_segments"):
        whisper.segment_embeddings(hidden, 0, valid_frames)


def _edit_checkpoint(directory, edit):
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_checkpoint_that_does_not_fit_is_named(tmp_path):
    _save_hf("odd", tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.pop("model.encoder.embed_positions.weight"))
    with pytest.raises(conversion.ConversionError, match=r"missing .*position_embed \(HF name like '.*embed_positions"):
        convert.convert_whisper(str(tmp_path))
    _save_hf("odd", tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.pop("model.encoder.layers.1.fc2.bias"))
    with pytest.raises(conversion.ConversionError, match=r"missing layers \[1\].*fc2"):
        convert.convert_whisper(str(tmp_path))
    _save_hf("odd", tmp_path)  # Whisper's key projection has no bias: one in a checkpoint is not ours

    def add_key_bias(tensors):
        tensors["model.encoder.layers.0.self_attn.k_proj.bias"] = np.zeros(36, np.float32)

    _edit_checkpoint(tmp_path, add_key_bias)
    with pytest.raises(
        conversion.ConversionError, match=r"unexpected tensor 'model\.encoder\.layers\.0\.self_attn\.k_proj\.bias'"
    ):
        convert.convert_whisper(str(tmp_path))


def test_clap_and_whisper_are_mutually_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert.main(
            ["--clap", str(tmp_path / "clap"), "--whisper", str(tmp_path / "whisper"), "--out", str(tmp_path / "out")]
        )
    assert "argument --whisper: not allowed with argument --clap" in capsys.readouterr().err
    with pytest.raises(conversion.ConversionError, match="--clap and --whisper are mutually exclusive"):
        convert.convert(clap=str(tmp_path / "clap"), whisper=str(tmp_path / "whisper"), out=str(tmp_path / "out"))
    with pytest.raises(SystemExit):
        convert.main(["--help"])
    assert "--whisper" in capsys.readouterr().out


def test_whisper_converts_end_to_end(tmp_path):
    """--whisper DIR --out OUT, then load_model(OUT).audio, a WhisperEncoder stored as the part
    'audio', equals HF's encoder."""
    hf_encoder = _save_hf("odd", tmp_path / "whisper")
    convert.main(["--whisper", str(tmp_path / "whisper"), "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["avllm"]
    assert saved["audio"]["kind"] == "whisper" and saved["audio"]["d_model"] == 36 and "whisper" not in saved
    assert set(ocp.StandardCheckpointer().restore((tmp_path / "out" / "params").absolute())) == {"audio"}
    model = avllm_jax.load_model(tmp_path / "out")
    assert isinstance(model.audio, whisper.WhisperEncoder) and model.config.audio.kind == "whisper"
    assert model.vision is None and model.llm is None
    features = whisper_audio_features(_clip(2.0), 128)[0][None]
    with torch.no_grad():
        reference = hf_encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert_parity(
        nnx.jit(lambda m, x: m(x))(model.audio, features), reference, "converted whisper audio tower", TOLERANCE
    )


def test_a_checkpoint_of_the_old_layout_loads_as_the_audio_part(tmp_path):
    """Written before the Whisper encoder was the part 'audio': config.json names it 'whisper' and
    the parameters are stored under that name. load_model reads it, from params/ and from a
    training workdir's step, as the same model; training refuses to resume such a workdir, whose
    optimizer state names it so too, and says how to start from it."""
    _save_hf("odd", tmp_path / "hf")
    convert.convert(whisper=str(tmp_path / "hf"), out=str(tmp_path / "new"))
    new = avllm_jax.load_model(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "config.json").read_text())["avllm"]
    fields = {k: v for k, v in saved["audio"].items() if k != "kind"}
    old_config = {"avllm": saved | {"audio": None, "whisper": fields}}
    params = ocp.StandardCheckpointer().restore((tmp_path / "new" / "params").absolute())
    old_params = {"whisper": params["audio"]}  # encoders only: no projectors
    for layout in ("converted", "workdir"):
        old = tmp_path / layout
        old.mkdir()
        (old / "config.json").write_text(json.dumps(old_config))
        if layout == "converted":
            checkpoint.save_params(str(old / "params"), old_params)
        else:
            manager = checkpointing.checkpoint_manager(str(old), save_every=1, keep=1)
            manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(old_params)))
            manager.wait_until_finished()
            manager.close()
        model = avllm_jax.load_model(old)
        assert model.config == new.config and isinstance(model.audio, whisper.WhisperEncoder), layout
        jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(new))
    with pytest.raises(train.SetupError, match=r"cannot be resumed: .* --config.init_checkpoint=.*workdir$"):
        train.train(config_lib.base_config(), str(tmp_path / "workdir"))


def test_config_from_hf_and_presets():
    assert (
        whisper.WhisperEncoderConfig.from_hf(transformers.WhisperConfig().to_dict()) == whisper.PRESETS["whisper_tiny"]
    )
    small = transformers.WhisperConfig(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072)
    assert whisper.WhisperEncoderConfig.from_hf(small.to_dict()) == whisper.PRESETS["whisper_small"]
    assert (
        whisper.PRESETS["whisper_large_v3"].num_mel_bins == 128 and whisper.PRESETS["whisper_large"].num_mel_bins == 80
    )
    assert whisper.PRESETS["whisper_base"].num_features == 512 and whisper.PRESETS["whisper_base"].num_frames == 3000
    config = whisper.WhisperEncoderConfig.from_hf(
        small.to_dict(), param_dtype="bfloat16", attention_implementation="cudnn"
    )
    assert config.param_dtype == "bfloat16" and config.attention_implementation == "cudnn" and config.d_model == 768
    with pytest.raises(TypeError, match="WhisperEncoderConfig has no field"):
        whisper.WhisperEncoderConfig.from_hf(small.to_dict(), heads=3)
    with pytest.raises(ValueError, match="activation_function"):
        whisper.WhisperEncoderConfig.from_hf(dict(small.to_dict(), activation_function="relu"))
    with pytest.raises(ValueError, match="multiple of 5 heads"):
        whisper.WhisperEncoderConfig(d_model=36, encoder_attention_heads=5)


def test_sinusoids_are_hf_positions():
    from transformers.models.whisper.modeling_whisper import sinusoids

    # HF's angles are float32: off by up to 1500 rad * 1 ulp of the timescale, ~1e-4
    np.testing.assert_allclose(whisper.sinusoids(1500, 384), sinusoids(1500, 384).numpy(), atol=2e-4)


def test_parameters_carry_logical_axes():
    model = nnx.eval_shape(lambda: whisper.WhisperEncoder(whisper.PRESETS["tiny"], rngs=nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    axes = {".".join(map(str, path)): variable.get_metadata()["logical_axes"] for path, variable in params}
    for path, variable in params:
        name = ".".join(map(str, path))
        assert len(axes[name]) == variable.get_value().ndim, name
        assert (axes[name][0] == "layers") == name.startswith("layers."), name
    assert axes["layers.q_proj"] == ("layers", "embed", "heads", "kv")
    assert axes["layers.fc1.kernel"] == ("layers", "embed", "mlp")
    assert "layers.k_bias" not in axes and axes["position_embed"] == (None, "embed")


def test_bad_features_are_rejected():
    model = nnx.eval_shape(lambda: whisper.WhisperEncoder(whisper.PRESETS["tiny"], rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\[B, 80, 3000\]"):
        model(np.zeros((1, 80, 1500), np.float32))
