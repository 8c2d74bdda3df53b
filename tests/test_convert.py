"""tools/convert_hf_weights.py (avllm_jax/convert.py) end to end: HF directories in, `load_model(OUT)` out."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from hf_reference import assert_parity, build_hf, save_tiny_tokenizer

import avllm_jax
from avllm_jax import convert
from avllm_jax.data.conversation import load_tokenizer
from avllm_jax.modality import MODALITY_TOKENS

CLIP = dict(
    image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    clip = build_hf(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**CLIP))
    clip.save_pretrained(root / "clip")
    tokenizer = save_tiny_tokenizer(root / "llm")
    llm = build_hf(transformers.LlamaForCausalLM, transformers.LlamaConfig(vocab_size=len(tokenizer), **LLAMA))
    # Sharded safetensors with an index, as large checkpoints ship.
    llm.save_pretrained(root / "llm", max_shard_size="100KB")
    assert (root / "llm" / "model.safetensors.index.json").exists()
    return {"root": root, "clip": clip, "llm": llm, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    convert.main(["--clip", str(hf_dirs["root"] / "clip"), "--llm", str(hf_dirs["root"] / "llm"), "--out", str(out)])
    return out


def test_load_model_parts_match_hf(hf_dirs, converted):
    model = avllm_jax.load_model(converted)
    pixels = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        clip_reference = hf_dirs["clip"](torch.tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    assert_parity(model.vision(jnp.asarray(pixels)), clip_reference, "converted clip")

    ids = np.random.RandomState(1).randint(0, len(hf_dirs["tokenizer"]), (2, 12))
    with torch.no_grad():
        llm_reference = hf_dirs["llm"](torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model.llm(jnp.asarray(ids)))
    # Our vocabulary has the three modality tokens appended; the original rows are unchanged.
    assert ours.shape[-1] == len(hf_dirs["tokenizer"]) + 3
    assert_parity(ours[..., : llm_reference.shape[-1]], llm_reference, "converted llama")


def test_modality_tokens_added_with_mean_embeddings(hf_dirs, converted):
    tokenizer = load_tokenizer(converted)
    model = avllm_jax.load_model(converted)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in MODALITY_TOKENS]
    assert list(model.config.modality_token_ids) == ids
    assert model.config.llm.vocab_size == len(tokenizer) == model.llm.embed.shape[0]
    original = hf_dirs["llm"].model.embed_tokens.weight.detach().numpy()
    for token_id in ids:
        np.testing.assert_allclose(np.asarray(model.llm.embed[...])[token_id], original.mean(axis=0), atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(model.llm.lm_head[...])[:, token_id],
            hf_dirs["llm"].lm_head.weight.detach().numpy().mean(axis=0),
            atol=1e-6,
        )
    # A prompt keeps each modality token whole.
    encoded = tokenizer("USER: <AUD_VIS>\nwhat is it?").input_ids
    assert ids[2] in encoded and ids[0] not in encoded


def test_bfloat16_output(hf_dirs, tmp_path):
    convert.main(["--clip", str(hf_dirs["root"] / "clip"), "--out", str(tmp_path), "--dtype", "bfloat16"])
    model = avllm_jax.load_model(tmp_path)
    assert model.llm is None and model.vision.patch_embed[...].dtype == jnp.bfloat16


def test_config_vocab_differs_from_matrix(tmp_path, hf_dirs):
    """Vicuna v0/v1.1: config.json's vocab_size disagrees with the embedding matrix."""
    llm_dir = tmp_path / "llm"
    hf_dirs["llm"].save_pretrained(llm_dir)
    hf_dirs["tokenizer"].save_pretrained(llm_dir)
    config = json.loads((llm_dir / "config.json").read_text())
    config["vocab_size"] += 7
    (llm_dir / "config.json").write_text(json.dumps(config))
    convert.main(["--llm", str(llm_dir), "--out", str(tmp_path / "out")])
    model = avllm_jax.load_model(tmp_path / "out")
    assert model.llm.embed.shape[0] == model.config.llm.vocab_size == len(hf_dirs["tokenizer"]) + 3


def _edit_single_file_checkpoint(src_model, directory, edit):
    src_model.save_pretrained(directory)
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_renamed_tensor_is_refused_by_name(hf_dirs, tmp_path):
    def rename(tensors):
        tensors["encoder.layers.1.mlp.fc9.weight"] = tensors.pop("encoder.layers.1.mlp.fc1.weight")

    _edit_single_file_checkpoint(hf_dirs["clip"], tmp_path / "clip", rename)
    with pytest.raises(SystemExit, match=r"unexpected tensor 'encoder\.layers\.1\.mlp\.fc9\.weight'"):
        convert.main(["--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "out")])


def test_missing_tensor_is_refused_by_name(hf_dirs, tmp_path):
    _edit_single_file_checkpoint(hf_dirs["clip"], tmp_path / "clip", lambda t: t.pop("post_layernorm.bias"))
    with pytest.raises(SystemExit, match=r"missing .*post_norm\.bias"):
        convert.main(["--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "out")])


def test_missing_layer_is_refused_by_name(hf_dirs, tmp_path):
    _edit_single_file_checkpoint(hf_dirs["clip"], tmp_path / "clip", lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(SystemExit, match=r"missing layers \[1\].*fc2"):
        convert.main(["--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "out")])


def test_reshaped_tensor_is_refused_by_name(hf_dirs, tmp_path):
    def reshape(tensors):
        tensors["encoder.layers.0.mlp.fc2.weight"] = tensors["encoder.layers.0.mlp.fc2.weight"][:, :-1].copy()

    _edit_single_file_checkpoint(hf_dirs["clip"], tmp_path / "clip", reshape)
    with pytest.raises(SystemExit, match=r"'encoder\.layers\.0\.mlp\.fc2\.weight'.*shape"):
        convert.main(["--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "out")])


def test_pickle_checkpoint_needs_allow_pickle(hf_dirs, tmp_path):
    clip_dir = tmp_path / "clip"
    hf_dirs["clip"].save_pretrained(clip_dir)
    state = {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(clip_dir / "model.safetensors").items()}
    os.remove(clip_dir / "model.safetensors")
    torch.save(state, clip_dir / "pytorch_model.bin")
    with pytest.raises(SystemExit, match="--allow-pickle"):
        convert.main(["--clip", str(clip_dir), "--out", str(tmp_path / "out")])
    convert.main(["--clip", str(clip_dir), "--out", str(tmp_path / "out"), "--allow-pickle"])
    model = avllm_jax.load_model(tmp_path / "out")
    np.testing.assert_array_equal(
        np.asarray(model.vision.class_embed[...]), state["embeddings.class_embedding"].numpy()
    )


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        convert.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--clip", "--clap", "--llm", "--tokenizer", "--out", "--dtype", "--allow-pickle", "--seed"):
        assert flag in text


def test_clap_audio_tower_converts_and_runs(tmp_path):
    """--clap with a full ClapModel (text tower dropped): load_model(OUT).audio equals HF's pooled output."""
    audio = dict(
        spec_size=128, window_size=4, depths=[2, 1, 2, 2], num_attention_heads=[2, 4, 8, 8], patch_embeds_hidden_size=16
    )
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    clap = build_hf(
        transformers.ClapModel, transformers.ClapConfig(audio_config=audio, text_config=text, projection_dim=16)
    )
    clap.save_pretrained(tmp_path / "clap")
    convert.main(["--clap", str(tmp_path / "clap"), "--out", str(tmp_path / "out")])
    model = avllm_jax.load_model(tmp_path / "out")
    assert model.vision is None and model.llm is None
    from avllm_jax.data.features import clap_audio_features

    waveforms = np.random.RandomState(0).randn(2, 48000).astype(np.float32) * 0.1
    features, is_longer = clap_audio_features(waveforms, truncation="rand_trunc", max_length_s=2.0)
    with torch.no_grad():
        reference = clap.audio_model(torch.from_numpy(features)).pooler_output.numpy()
    assert_parity(
        model.audio(jnp.asarray(features), jnp.asarray(is_longer)), reference, "converted CLAP audio tower (pooled)"
    )
