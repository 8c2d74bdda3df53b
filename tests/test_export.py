"""tools/export_hf.py (avllm_jax/export.py): the exported LLM in `transformers` gives our logits,
converting the export back gives the same weights bit for bit, the side file and the model
card say what they should, and unusable inputs are refused with the reason."""

import importlib.util
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from hf_reference import assert_parity
from tiny_models import tiny_config, tiny_tokenizer

import avllm_jax
from avllm_jax import checkpoint, convert, export
from avllm_jax.models import avllm, llama

REPO = pathlib.Path(__file__).resolve().parents[1]
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)
VARIANTS = {
    "untied GQA": {},
    "tied, llama3 rope": dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
}


def demo_train_config(**changes) -> dict:
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return json.loads(module.get_config().to_json_best_effort()) | changes


def write_workdir(directory, llm_changes, seed=0, audio_kind="htsat"):
    """A model directory as training leaves it (params, config, tokenizer, data and train
    configs), with every weight random, norm scales included, so that a swapped tensor shows."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer, audio_kind=audio_kind)
    config = avllm.AVLLMConfig(
        vision=config.vision,
        audio=config.audio,
        modality_token_ids=config.modality_token_ids,
        llm=llama.LlamaConfig(**{**config.llm.__dict__, **llm_changes}),
    )
    model = avllm.AVLLM(config, rngs=nnx.Rngs(seed))
    rng = np.random.RandomState(seed)
    params = jax.tree.map(
        lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), nnx.to_pure_dict(nnx.state(model))
    )
    checkpoint.save_params(str(directory / checkpoint.PARAMS_DIR), params)
    checkpoint.write_model_config(str(directory), config)
    tokenizer.save_pretrained(directory)
    return avllm_jax.load_model(directory), tokenizer


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    workdir = root / "run"
    workdir.mkdir()
    model, tokenizer = write_workdir(workdir, VARIANTS[request.param])
    out = root / "hf"
    export.export(str(workdir), str(out))
    return request.param, workdir, model, tokenizer, out


def test_transformers_gives_our_logits(exported):
    name, _, model, tokenizer, out = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.RandomState(1).randint(0, len(tokenizer), (2, 24))
    with torch.no_grad():
        reference = hf(torch.tensor(ids)).logits.numpy()
    assert_parity(model.llm(ids), reference, f"exported llama, {name}")
    assert transformers.AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()


def test_converting_the_export_back_is_exact(exported, tmp_path):
    name, workdir, model, _, out = exported
    back = tmp_path / "back"
    convert.main(["--llm", str(out), "--out", str(back)])
    ours = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.llm)))
    again = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(avllm_jax.load_model(back).llm)))
    assert jax.tree.structure(ours) == jax.tree.structure(again)
    differing = [
        jax.tree_util.keystr(path)
        for path, a, b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ours), jax.tree.leaves(again))
        if a.dtype != b.dtype or not np.array_equal(a, b)
    ]
    print(f"ROUND TRIP {name}: {len(jax.tree.leaves(ours))} LLM tensors, {len(differing)} differ")
    assert not differing
    assert checkpoint.read_model_config(str(back)).llm == model.config.llm
    # The projectors, which the converter does not read, are in the side file unchanged.
    projectors = safetensors.numpy.load_file(out / export.PROJECTORS_FILE)
    for key, value in projectors.items():
        projector, leaf = key.split(".")
        np.testing.assert_array_equal(value, np.asarray(getattr(getattr(model, projector), leaf)[...]))
    assert sorted(projectors) == sorted(
        f"{p}.{leaf}" for p in ("temporal_proj", "spatial_proj", "audio_proj") for leaf in ("kernel", "bias")
    )


def test_shards_card_and_side_file(tmp_path):
    base, stage1, workdir = tmp_path / "converted", tmp_path / "pretrain", tmp_path / "sft"
    for directory in (stage1, workdir):
        directory.mkdir()
    model, _ = write_workdir(workdir, {})
    (stage1 / checkpoint.TRAIN_CONFIG_FILE).write_text(
        json.dumps(demo_train_config(init_checkpoint=str(base), trainable=[r"(temporal|spatial|audio)_proj\..*"]))
    )
    sources = [{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]
    sft = demo_train_config(init_checkpoint=str(stage1))
    sft["data"]["sources"] = sources
    (workdir / checkpoint.TRAIN_CONFIG_FILE).write_text(json.dumps(sft))
    checkpoint.write_data_config(str(workdir), ml_collections.ConfigDict(sft["data"]))
    out = tmp_path / "hf"
    export.main(
        [str(workdir), "--out", str(out), "--base-model", "lmsys/vicuna-7b-v1.5", "--max-shard-gb", str(40_000 / 2**30)]
    )

    index = json.loads((out / export.SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, and the converter reads shards (round-trip test)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = np.arange(10)[None]
    with torch.no_grad():
        assert_parity(model.llm(ids), hf(torch.tensor(ids)).logits.numpy(), "exported llama, sharded")

    card = (out / export.CARD_FILE).read_text()
    assert "base_model:\n- lmsys/vicuna-7b-v1.5" in card
    assert card.index(f"Stage 1: `{stage1}`") < card.index(f"Stage 2: `{workdir}`")
    assert f"starts from: `{base}`" in card and r"`(temporal|spatial|audio)_proj\..*`" in card and r"`llm\..*`" in card
    assert (
        "`data/instructions.jsonl` (weight 1.0, media under `data/media`)" in card
        and f"{sft['num_steps']} steps" in card
        and "global batch 4 packs (each 2 x 160 positions" in card
    )
    assert "`model-*.safetensors`: the LLM in" in card
    extras = json.loads((out / export.EXTRAS_FILE).read_text())
    assert extras["modality_tokens"] == dict(zip(("<VIS>", "<AUD>", "<AUD_VIS>"), model.config.modality_token_ids))
    assert extras["projectors"]["temporal_proj"]["kernel"] == [
        model.config.vision.hidden_size,
        model.config.llm.hidden_size,
    ]
    # The encoder configs read back with avllm_jax's own loader.
    side = avllm.AVLLMConfig.from_dict({"vision": extras["vision"], "audio": extras["audio"]})
    assert (side.vision, side.audio) == (model.config.vision, model.config.audio)
    assert extras["audio"]["kind"] == "htsat" and "audio encoder (HTSAT): frozen" in card
    assert extras["media"] == {
        "num_frames": 4,
        "image_size": 64,
        "num_audio_segments": 4,
        "audio_sample_rate": 48000,
        "audio_front_end": "clap",
        "audio_max_length_s": 0.4,
        "audio_truncation": "rand_trunc",
        "whisper_mel_bins": 80,
    }  # the workdir's data_config.json


def test_a_whisper_models_side_file_and_card_name_its_audio_encoder(tmp_path):
    model, _ = write_workdir(tmp_path / "run", {}, audio_kind="whisper")
    export.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    extras = json.loads((tmp_path / "hf" / export.EXTRAS_FILE).read_text())
    assert extras["audio"]["kind"] == "whisper" and "whisper" not in extras
    assert avllm.AVLLMConfig.from_dict({"audio": extras["audio"]}).audio == model.config.audio
    assert "audio encoder (Whisper): frozen" in (tmp_path / "hf" / export.CARD_FILE).read_text()


def test_unusable_inputs_are_refused_with_the_reason(tmp_path, capsys):
    encoders_only = tmp_path / "encoders"
    config = tiny_config(tiny_tokenizer())
    checkpoint.write_model_config(str(encoders_only), avllm.AVLLMConfig(vision=config.vision))
    with pytest.raises(SystemExit, match=f"error: {encoders_only} holds no LLM"):
        export.main([str(encoders_only), "--out", str(tmp_path / "a")])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=f"error: {busy} is not an empty directory"):
        export.main([str(encoders_only), "--out", str(busy)])
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'nowhere'} has no config.json"):
        export.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")])
    assert (busy / "notes.txt").read_text() == "keep me" and not (tmp_path / "a").exists()
