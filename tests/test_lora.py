"""LoRA on the LLM (the paper's Table 9): new adapters change no logit, trained ones fold into
the dense weights without changing the logits, only adapters and projectors train, a target
that matches nothing is refused, a checkpoint loads folded or apart, a LoRA run starts with
new adapters laid out on the mesh, and the planner shows the memory LoRA saves."""

import dataclasses
import json

import jax
import ml_collections
import numpy as np
import optax
import plan_config
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import PartitionSpec
from tiny_models import tiny_tokenizer

from avllm_jax import checkpoint, export, plan
from avllm_jax.models import avllm, clip_vision, llama
from avllm_jax.training import config as config_lib
from avllm_jax.training import optim, sharding

LORA = ml_collections.ConfigDict(
    dict(rank=4, alpha=8.0, targets=(r"layers\.(q|k|v|o)_proj", r"layers\.(gate|up|down)_proj"))
)
TRAINABLE = (r"(temporal|spatial)_proj\..*", config_lib.LORA_ADAPTERS)
# The LLM alone, except where the projectors are counted (from shapes): the vision tower took
# half of the test's time to build, and adapters have nothing to do with it.
BASE_CONFIG = avllm.AVLLMConfig(llm=llama.PRESETS["tiny"])
LORA_CONFIG = optim.apply_lora(BASE_CONFIG, LORA)
IDS = np.random.RandomState(0).randint(0, llama.PRESETS["tiny"].vocab_size, (2, 12))


@nnx.jit  # compiled once per model structure: eagerly, every call re-traced the layer scan
def llm_logits(model):
    return model.llm(IDS)


def logits(model) -> np.ndarray:
    return np.asarray(llm_logits(model))


def make_optimizer(trainable):
    optim_config = config_lib.base_config().optim
    optim_config.update(dict(learning_rate=1e-2, warmup_fraction=0.0))
    return optim.make_optimizer(optim_config, 10, trainable)


def train_adapters(model, steps=3):
    """A few AdamW steps of next-token loss on IDS through training's filter and optimizer."""
    graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter(TRAINABLE), ...)
    optimizer = make_optimizer(trainable)

    @jax.jit
    def step(trainable, opt_state, frozen):
        def loss(trainable):
            out = nnx.merge(graphdef, trainable, frozen).llm(IDS)
            return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], IDS[:, 1:]).mean()

        updates, opt_state = optimizer.update(jax.grad(loss)(trainable), opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    opt_state = optimizer.init(trainable)
    for _ in range(steps):
        trainable, opt_state = step(trainable, opt_state, frozen)
    return nnx.merge(graphdef, trainable, frozen)


def save(directory, model):
    checkpoint.save_params(str(directory / checkpoint.PARAMS_DIR), nnx.to_pure_dict(nnx.state(model)))
    checkpoint.write_model_config(str(directory), model.config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A model without adapters saved as a converted checkpoint, and a LoRA run from it (its
    base weights, adapters trained a few steps) saved as a run's directory."""
    root = tmp_path_factory.mktemp("lora")
    base = avllm.AVLLM(BASE_CONFIG, rngs=nnx.Rngs(0))
    save(root / "base", base)
    lora = avllm.AVLLM(LORA_CONFIG, rngs=nnx.Rngs(1))
    nnx.update(lora, nnx.state(base))
    new_logits = logits(lora)
    trained = train_adapters(lora)
    save(root / "run", trained)
    return dict(root=root, base=base, new_logits=new_logits, trained=trained)


def test_new_adapters_change_no_logit(runs):
    np.testing.assert_array_equal(runs["new_logits"], logits(runs["base"]))


def test_only_adapters_and_projectors_train():
    """On the model with its vision tower and projectors, from shapes alone."""
    config = optim.apply_lora(avllm.AVLLMConfig(vision=clip_vision.PRESETS["tiny"], llm=llama.PRESETS["tiny"]), LORA)
    model = nnx.eval_shape(lambda: avllm.AVLLM(config, rngs=nnx.Rngs(0)))
    _, trainable, frozen = nnx.split(model, optim.trainable_filter(TRAINABLE), ...)
    names = {optim.path_name(path) for path, _ in nnx.to_flat_state(trainable)}
    adapters = {f"llm.layers.lora.{p}.{m}" for p in llama.ADAPTABLE_PROJECTIONS for m in "ab"}
    assert names == adapters | {f"{p}_proj.{leaf}" for p in ("temporal", "spatial") for leaf in ("kernel", "bias")}
    assert all(isinstance(v, nnx.LoRAParam) for p, v in nnx.to_flat_state(trainable) if p[0] == "llm")
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(frozen))
    # AdamW's two moments per trainable array and nothing more: no LLM base weight has any.
    moments = [x for x in jax.tree.leaves(jax.eval_shape(make_optimizer(trainable).init, trainable)) if x.ndim]
    assert len(moments) == 2 * len(names)
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(trainable))


def test_trained_adapters_fold_into_the_weights(runs, tmp_path):
    """The run's directory loads folded (no adapters, W + scale·A@B) by default and apart with
    keep_adapters; both give the trained model's logits, and export writes the folded weights."""
    trained = logits(runs["trained"])
    assert np.abs(trained - logits(runs["base"])).max() > 1e-3  # the adapters learnt something
    kept = checkpoint.load_model(runs["root"] / "run", keep_adapters=True)
    np.testing.assert_array_equal(logits(kept), trained)
    folded = checkpoint.load_model(runs["root"] / "run")
    assert folded.config.llm == llama.PRESETS["tiny"] and not nnx.state(folded, nnx.LoRAParam)
    np.testing.assert_allclose(logits(folded), trained, atol=1e-5, rtol=0)

    run = runs["root"] / "run"
    tiny_tokenizer().save_pretrained(run)
    (run / checkpoint.TRAIN_CONFIG_FILE).write_text(json.dumps({"trainable": list(TRAINABLE), "lora": LORA.to_dict()}))
    export.export(str(run), str(tmp_path / "hf"))
    written = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    expected = dict(export.hf_llama_tensors(nnx.to_pure_dict(nnx.state(folded.llm)), folded.config.llm))
    assert written.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(written[name], np.asarray(value), err_msg=name)
    assert "LoRA on the LLM: rank 4, alpha 8.0" in (tmp_path / "hf" / export.CARD_FILE).read_text()


def test_a_lora_run_starts_with_new_adapters_on_the_mesh(runs):
    """What training does with configs/ablations/table9_lora.py: the model config with the
    run's adapters, restored onto an 8-device FSDP mesh. From a checkpoint without adapters they
    are new (B = 0) and split over 'fsdp' where the kernel's input or output is 'embed'; from a
    LoRA run's directory its adapters are folded first, and new ones made."""
    model_config = optim.apply_lora(checkpoint.read_model_config(str(runs["root"] / "base")), LORA)
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    with jax.set_mesh(mesh):
        model = sharding.create_sharded_model(model_config, str(runs["root"] / "base"), mesh, seed=0)
        after_lora = sharding.create_sharded_model(model_config, str(runs["root"] / "run"), mesh, seed=0)
    adapters = model.llm.layers.lora
    assert model.config == after_lora.config == LORA_CONFIG and set(adapters) == set(llama.ADAPTABLE_PROJECTIONS)
    assert adapters["q_proj"].a.get_value().sharding.spec == PartitionSpec(None, "fsdp", None)
    assert adapters["down_proj"].b.get_value().sharding.spec == PartitionSpec(None, None, "fsdp")
    for new in (model, after_lora):  # B = 0: the logits are the base weights' (test_new_adapters_change_no_logit)
        assert not any(np.any(np.asarray(adapter.b.get_value())) for adapter in new.llm.layers.lora.values())
        assert all(np.any(np.asarray(adapter.a.get_value())) for adapter in new.llm.layers.lora.values())

    def base_weights(model):
        return jax.tree.leaves(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))))

    assert all(np.array_equal(a, b) for a, b in zip(base_weights(model), base_weights(runs["base"])))
    folded = checkpoint.load_model(runs["root"] / "run")
    for a, b in zip(base_weights(after_lora), base_weights(folded)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # Rank 0 takes the adapters off the model config: a full-tuning run loads a LoRA run folded.
    assert optim.apply_lora(LORA_CONFIG, ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=()))) == BASE_CONFIG


def test_a_target_matching_no_projection_is_refused():
    llm = dataclasses.replace(llama.PRESETS["tiny"], lora_rank=4, lora_targets=(r"layers\.q_proj", r"layers\.qkv_proj"))
    with pytest.raises(
        ValueError, match=r"LoRA target 'layers\\\.qkv_proj' matches none of the LLM's projections: layers\.q_proj"
    ):
        llama.Llama(llm, rngs=nnx.Rngs(0))


def lora_run_config(**lora):
    config = config_lib.base_config()
    config.lora.update(dict(rank=8, targets=(r"layers\.(q|v)_proj",)) | lora)
    config.trainable = TRAINABLE
    return config


def config_problems(config) -> str:
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.check_config(config)
    return str(error.value)


def test_the_config_check_names_what_is_wrong():
    config_lib.check_config(lora_run_config())
    assert r"config.lora: LoRA target 'mlp\.up' matches none" in config_problems(lora_run_config(targets=(r"mlp\.up",)))
    full_llm = lora_run_config()
    full_llm.trainable = (r"(temporal|spatial|audio)_proj\..*", r"llm\..*")
    assert (
        "config.lora.rank=8 freezes the LLM's base weights, but config.trainable trains llm.embed"
        in config_problems(full_llm)
    )
    projectors_only = lora_run_config()
    projectors_only.trainable = (r"(temporal|spatial|audio)_proj\..*",)
    assert "config.trainable trains no adapter" in config_problems(projectors_only)
    in_the_model_block = lora_run_config()
    in_the_model_block.model.llm.lora_rank = 8
    assert "config.model.llm.lora_rank is set: LoRA is set through config.lora" in config_problems(in_the_model_block)


def test_the_planner_shows_what_lora_saves():
    """The tiny SFT step of tests/plan_config.py on 2 devices, full tuning against LoRA: the
    train state (the compiled step's arguments and outputs) loses the LLM's Adam moments."""
    full = plan_config.get_config()
    lora = plan_config.get_config()
    lora.lora.update(LORA.to_dict())
    lora.trainable = (r"(temporal|spatial|audio)_proj\..*", config_lib.LORA_ADAPTERS)
    full_plan, lora_plan = (plan.compile_plan(config, plan.topology("cpu:2")) for config in (full, lora))
    assert lora_plan.memory["arguments"] < 0.7 * full_plan.memory["arguments"]
    assert lora_plan.memory["outputs"] < 0.2 * full_plan.memory["outputs"]
    assert lora_plan.memory["total"] < full_plan.memory["total"]
