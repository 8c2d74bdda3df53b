"""HTSAT against transformers' ClapAudioModel on random weights, through the real conversion
path (save_pretrained -> safetensors -> hf_rules -> load_into), float32.

Tolerance: max |ours - HF| <= 1e-4 * max |HF| for the pooled output and the last hidden state.
HF's own initialisation leaves biases, relative position tables and batch-norm statistics at
0/1, so every float tensor is re-drawn before saving, or a mapping mistake could hide.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_reference import assert_parity, convert_saved

from avllm_jax.data.features import clap_audio_features
from avllm_jax.models import htsat
from avllm_jax.models.conversion import ConversionError, read_hf_config

TOLERANCE = 1e-4
SMALL_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)


def _randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "running_var" in name:
                tensor.copy_(0.5 + noise.abs())
            elif tensor.ndim == 1 and name.endswith("weight"):  # norm scales
                tensor.copy_(1.0 + 0.2 * noise)
            elif tensor.ndim <= 1 or "relative_position_bias_table" in name:
                tensor.copy_(0.1 * noise)
            else:  # fan-in scaled, so activations stay O(1) through 12 blocks
                tensor.copy_(noise * tensor[0].numel() ** -0.5)


def _save(audio_config, directory, *, full_clap):
    """A random HF model saved as a checkpoint; a full ClapModel also carries a text tower."""
    if full_clap:
        config = transformers.ClapConfig(audio_config=audio_config, text_config=SMALL_TEXT, projection_dim=16)
        model = transformers.ClapModel(config)
        _randomize(model)
        audio_model = model.audio_model
    else:
        audio_model = model = transformers.ClapAudioModel(transformers.ClapAudioConfig(**audio_config))
        _randomize(model)
    model.save_pretrained(directory)
    return audio_model.eval()


def _convert(directory, *, config=None):
    config = config or htsat.HTSATConfig.from_hf(read_hf_config(directory))
    return convert_saved(directory, htsat.HTSAT, config, htsat.hf_rules(config))


def _assert_matches_hf(model, hf_model, features, is_longer, what):
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(features), is_longer=torch.from_numpy(is_longer)[:, None])
    forward = nnx.jit(lambda m, x, longer: m(x, longer, return_last_hidden_state=True))
    pooled, last = jax.device_get(forward(model, features, is_longer))
    hf_pooled = expected.pooler_output.numpy()
    hf_last = expected.last_hidden_state.numpy().transpose(0, 2, 3, 1)  # HF is channels-first
    assert pooled.shape == hf_pooled.shape and last.shape == hf_last.shape
    assert_parity(pooled, hf_pooled, f"htsat {what} pooled", TOLERANCE)
    assert_parity(last, hf_last, f"htsat {what} last hidden state", TOLERANCE)
    # the two segments differ by far more than the tolerance, so mixing up the batch would fail
    assert np.abs(hf_pooled[0] - hf_pooled[1]).max() > 10 * TOLERANCE * np.abs(hf_pooled).max()


def _audio(seconds, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 48_000)) / 48_000
    chirp = np.sin(2 * np.pi * (200 + 300 * seed) * t * (1 + t))
    return (0.3 * chirp + 0.05 * rng.standard_normal(t.size))[None].astype(np.float32)


def _segments(truncation, max_length_s=10.0):
    """Two different segments from the front end: one longer than the window, one shorter."""
    parts = [
        clap_audio_features(
            _audio(seconds, seed), truncation=truncation, max_length_s=max_length_s, rng=np.random.default_rng(seed)
        )
        for seconds, seed in ((1.3 * max_length_s, 1), (0.6 * max_length_s, 2))
    ]
    features, is_longer = (np.concatenate(p) for p in zip(*parts))
    return features, is_longer


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_full_size_matches_hf(fused, tmp_path):
    """Default CLAP configs (~30M params); the fused one through a full ClapModel checkpoint,
    whose text tower and projections the rules drop."""
    hf_model = _save(dict(enable_fusion=fused), tmp_path, full_clap=fused)
    model = _convert(tmp_path)
    assert model.config == htsat.PRESETS["clap_htsat_fused" if fused else "clap_htsat_unfused"]
    features, is_longer = _segments("fusion" if fused else "rand_trunc")
    assert features.shape == (2, 4 if fused else 1, 1001, 64) and is_longer.tolist() == [True, False]
    _assert_matches_hf(model, hf_model, features, is_longer, "full size " + ("fused" if fused else "unfused"))


SMALL_CONFIGS = {
    # 1.5 s windows (151 frames, stretched to 256), window 6 pads 32x32 maps to 36x36, odd depth
    "window6-fused": (
        dict(
            spec_size=128,
            window_size=6,
            depths=[2, 3],
            num_attention_heads=[2, 4],
            patch_embeds_hidden_size=32,
            enable_fusion=True,
        ),
        1.5,
    ),
    # 2 s windows; four stages, the last one a single 4x4 window (attended unshifted), an
    # odd-depth stage, another MLP width
    "window4-unfused": (
        dict(
            spec_size=128,
            window_size=4,
            depths=[2, 1, 2, 2],
            num_attention_heads=[2, 4, 8, 8],
            patch_embeds_hidden_size=16,
            mlp_ratio=2.0,
        ),
        2.0,
    ),
}


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_small_config_matches_hf(name, tmp_path):
    audio_config, seconds = SMALL_CONFIGS[name]
    hf_model = _save(audio_config, tmp_path, full_clap=False)
    model = _convert(tmp_path)
    assert model.config.window_size == audio_config["window_size"]
    truncation = "fusion" if audio_config.get("enable_fusion") else "rand_trunc"
    _assert_matches_hf(model, hf_model, *_segments(truncation, max_length_s=seconds), name)


def test_config_from_hf():
    unfused = transformers.ClapAudioConfig().to_dict()
    assert htsat.HTSATConfig.from_hf(unfused) == htsat.PRESETS["clap_htsat_unfused"]
    fused_clap = transformers.ClapConfig(audio_config=dict(enable_fusion=True), text_config=SMALL_TEXT).to_dict()
    assert htsat.HTSATConfig.from_hf(fused_clap) == htsat.PRESETS["clap_htsat_fused"]
    assert htsat.PRESETS["clap_htsat_unfused"].num_features == 768
    with pytest.raises(ValueError, match="channel_map"):
        htsat.HTSATConfig.from_hf(dict(unfused, enable_fusion=True, fusion_type="channel_map"))
    with pytest.raises(ValueError, match="window_size"):
        htsat.HTSATConfig(spec_size=64, window_size=8)  # the last stage would be 2x2 patches


def test_config_from_hf_overrides_win():
    unfused = transformers.ClapAudioConfig().to_dict()  # sets enable_fusion=False
    config = htsat.HTSATConfig.from_hf(unfused, enable_fusion=True, param_dtype="bfloat16")
    assert config == dataclasses.replace(htsat.PRESETS["clap_htsat_fused"], param_dtype="bfloat16")
    with pytest.raises(TypeError, match="HTSATConfig has no field.*fusion"):
        htsat.HTSATConfig.from_hf(unfused, fusion=True)


def test_checkpoint_that_does_not_fit_is_named(tmp_path):
    audio_config, _ = SMALL_CONFIGS["window6-fused"]
    _save(audio_config, tmp_path, full_clap=False)
    unfused = htsat.HTSATConfig.from_hf(dict(audio_config, enable_fusion=False))
    fusion_tensor = r"unexpected tensor 'audio_encoder\.patch_embed\.(fusion_model|mel_conv2d)"
    with pytest.raises(ConversionError, match=fusion_tensor):
        _convert(tmp_path, config=unfused)
    wider = htsat.HTSATConfig.from_hf(dict(audio_config, patch_embeds_hidden_size=64))
    with pytest.raises(ConversionError, match="shape"):
        _convert(tmp_path, config=wider)


def test_parameters_carry_logical_axes():
    audio_config, _ = SMALL_CONFIGS["window4-unfused"]
    model = nnx.eval_shape(lambda: htsat.HTSAT(htsat.HTSATConfig.from_hf(audio_config), rngs=nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, variable in params:
        axes = variable.get_metadata()["logical_axes"]
        assert len(axes) == variable.get_value().ndim, path
        assert (axes[0] == "layers") == ("blocks" in path), path
    kernels = {".".join(map(str, p)): v.get_metadata()["logical_axes"] for p, v in params}
    assert kernels["stages.0.blocks.mlp_in.kernel"] == ("layers", "embed", "mlp")
    assert kernels["stages.0.blocks.query.kernel"] == ("layers", "embed", "heads")


def test_bad_features_are_rejected():
    audio_config, _ = SMALL_CONFIGS["window6-fused"]
    model = nnx.eval_shape(lambda: htsat.HTSAT(htsat.HTSATConfig.from_hf(audio_config), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\[B, 4, frames, 64\]"):
        model(np.zeros((1, 1, 151, 64), np.float32), np.array([False]))
    with pytest.raises(ValueError, match="is_longer"):
        model(np.zeros((1, 4, 151, 64), np.float32))
