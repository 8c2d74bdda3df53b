"""CLIP ViT tower against transformers' CLIPVisionModel on the same random weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_reference import assert_parity, build_hf, convert_saved

from avllm_jax.models import clip_vision, conversion
from avllm_jax.models.clip_vision import normalize_frames


def convert_clip(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    config = clip_vision.CLIPVisionConfig.from_hf(conversion.read_hf_config(tmp_path))
    return convert_saved(tmp_path, clip_vision.CLIPVision, config, clip_vision.hf_rules(config))


def with_config(model, **changes):
    """The same weights under a changed config (e.g. another select_layer)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    copy.config = dataclasses.replace(model.config, **changes)
    return copy


@pytest.mark.parametrize(
    "name, hf_config, batch",
    [
        (
            "tiny",
            dict(
                image_size=32,
                patch_size=8,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=3,
                num_attention_heads=4,
            ),
            3,
        ),
        (
            "ViT-L/14 width, 2 layers",
            dict(
                image_size=224,
                patch_size=14,
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=2,
                num_attention_heads=16,
            ),
            1,
        ),
    ],
)
def test_hidden_states_match_hf(tmp_path, name, hf_config, batch):
    hf_model = build_hf(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**hf_config))
    model = convert_clip(hf_model, tmp_path)
    size = hf_config["image_size"]
    pixels = np.random.RandomState(0).randn(batch, size, size, 3).astype(np.float32)
    with torch.no_grad():
        reference = hf_model(torch.tensor(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    last = model(jnp.asarray(pixels))
    assert_parity(last, reference.last_hidden_state.numpy(), f"clip {name} last hidden state")
    penultimate = with_config(model, select_layer=-2)(jnp.asarray(pixels))
    assert_parity(penultimate, reference.hidden_states[-2].numpy(), f"clip {name} hidden_states[-2]")
    pooled = model.post_norm(last[:, 0])
    assert_parity(pooled, reference.pooler_output.numpy(), f"clip {name} pooled (post-layernorm CLS)")


def test_full_clip_model_checkpoint_drops_text_tower(tmp_path):
    config = transformers.CLIPConfig(
        vision_config=dict(
            image_size=32,
            patch_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100
        ),
        projection_dim=16,
    )
    hf_model = build_hf(transformers.CLIPModel, config)
    hf_model.save_pretrained(tmp_path)
    ours = clip_vision.CLIPVisionConfig.from_hf(conversion.read_hf_config(tmp_path))
    assert (ours.hidden_size, ours.patch_size, ours.num_layers) == (32, 16, 1)
    model = convert_saved(tmp_path, clip_vision.CLIPVision, ours, clip_vision.hf_rules(ours))
    pixels = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        reference = hf_model.vision_model(torch.tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    assert_parity(model(jnp.asarray(pixels)), reference, "clip (from CLIPModel) last hidden state")


def test_config_from_hf_overrides_win():
    hf = transformers.CLIPVisionConfig(image_size=224, patch_size=14).to_dict()
    config = clip_vision.CLIPVisionConfig.from_hf(hf, image_size=336, select_layer=-2)
    assert (config.image_size, config.patch_size, config.select_layer) == (336, 14, -2)
    with pytest.raises(TypeError, match="CLIPVisionConfig has no field.*num_hidden_layers"):
        clip_vision.CLIPVisionConfig.from_hf(hf, num_hidden_layers=2)


def test_wrong_image_size_is_an_error():
    model = clip_vision.CLIPVision(clip_vision.PRESETS["tiny"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expects 32x32"):
        model(jnp.zeros((1, 48, 48, 3)))


def test_untrained_class_token_follows_the_picture():
    """A random tower's class token must tell a square on the left from one on the right:
    the demo's frozen random encoder relies on it (with HF's 0.02 initialisation the two
    differ by about 0.05% of the token's norm)."""
    model = clip_vision.CLIPVision(clip_vision.PRESETS["tiny"], rngs=nnx.Rngs(0))
    pictures = np.zeros((2, 32, 32, 3), np.uint8)
    pictures[0, 12:20, 2:10] = 255
    pictures[1, 12:20, 22:30] = 255
    class_tokens = np.asarray(model(normalize_frames(jnp.asarray(pictures)))[:, 0])
    relative_difference = np.linalg.norm(class_tokens[0] - class_tokens[1]) / np.linalg.norm(class_tokens[0])
    assert relative_difference > 0.02


def test_normalize_frames_matches_clip_processor():
    frames = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    processor = transformers.CLIPImageProcessor(do_resize=False, do_center_crop=False)
    expected = processor(list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(normalize_frames(frames), expected, atol=1e-6)
    on_device = normalize_frames(jnp.asarray(frames))
    assert isinstance(on_device, jax.Array) and on_device.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(on_device), expected, atol=1e-5)
