"""FSDP / tensor / data sharding on 8 CPU devices gives what one device gives; activations are
laid out by the same rules; gradients in the compute dtype are the float32 ones."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from tiny_models import NUM_FRAMES, mixed_batch, packed_batch, tiny_model, tiny_tokenizer

from avllm_jax.data import packing
from avllm_jax.models import avllm, layers
from avllm_jax.training import optim, sharding, step

OPTIM = ml_collections.ConfigDict(
    dict(
        learning_rate=1e-2,
        warmup_fraction=0.0,
        beta1=0.9,
        beta2=0.98,
        eps=1e-8,
        weight_decay=0.1,
        max_grad_norm=1.0,
        final_learning_rate=0.0,
    )
)
TRAINABLE = (r".*_proj\..*", r"llm\..*")


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=3)
    batch = mixed_batch(tokenizer, ("visual", "audio", "audio_visual", "text") * 2, seed=4)
    return model, batch


@pytest.fixture(scope="module")
def packed_setup(setup):
    """Eight packs of two samples each (one row of 480 positions; the tiny prompts are about
    210 tokens): one a device on the 8-device mesh."""
    model, _ = setup
    budget = packing.PackBudget(rows=1, row_length=480, frames=2 * NUM_FRAMES, visual_items=2, audio_clips=2)
    kinds = ("visual", "audio", "audio_visual", "text", "audio", "visual", "text", "audio_visual") * 2
    batch = packed_batch(tiny_tokenizer(), model.config, kinds, budget, seed=5)[0]
    assert batch["input_ids"].shape[0] == 8
    return model, batch


def run_one_step(model, batch, mesh_shape, num_microbatches=2):
    """One AdamW step of the model laid out on a mesh (None: one device, no mesh)."""
    devices = jax.devices()[:1] if mesh_shape is None else jax.devices()
    mesh = sharding.make_mesh(mesh_shape or (1, 1, 1), devices=devices)
    with jax.set_mesh(mesh):
        # From host copies: the step donates its inputs, and `model` is reused.
        state = jax.tree.map(np.asarray, nnx.state(model))
        state = jax.device_put(state, sharding.state_shardings(nnx.state(model), mesh))
        graphdef = nnx.graphdef(model)
        sharded_model = nnx.merge(graphdef, state)
        graphdef, trainable, frozen = nnx.split(sharded_model, optim.trainable_filter(TRAINABLE), ...)
        optimizer = optim.make_optimizer(OPTIM, total_steps=2, params=trainable)
        train_state = step.TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
        train_step = step.make_train_step(graphdef, optimizer, num_microbatches=num_microbatches)
        new_state, metrics = train_step(train_state, frozen, sharding.shard_batch(batch, mesh))
        q_proj_sharding = new_state.params["llm"]["layers"]["q_proj"].get_value().sharding
        return jax.device_get(nnx.to_pure_dict(new_state.params)), float(metrics["loss"]), q_proj_sharding


def test_logical_rules_shard_over_fsdp_and_tensor():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = sharding.logical_to_spec(("layers", "embed", "heads", "kv"), (2, 64, 4, 16), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    # A dimension its mesh axes do not divide stays whole.
    assert sharding.logical_to_spec(("vocab", "embed"), (303, 64), mesh) == jax.sharding.PartitionSpec(None, "fsdp")
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 2})
    assert dict(sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}


# Pure data parallelism (8, 1, 1) is in the slow run: (2, 2, 2) splits the batch over data too.
@pytest.mark.parametrize("mesh_shape", [pytest.param((8, 1, 1), marks=pytest.mark.slow), (1, 8, 1), (2, 2, 2)])
def test_mesh_matches_single_device(setup, mesh_shape):
    assert jax.device_count() == 8
    model, batch = setup
    reference_params, reference_loss, _ = run_one_step(model, batch, None)
    params, loss, q_proj_sharding = run_one_step(model, batch, mesh_shape)
    np.testing.assert_allclose(loss, reference_loss, rtol=0, atol=1e-5)
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), params, reference_params)
    worst = max(jax.tree.leaves(diffs))
    print(f"mesh {mesh_shape}: |loss diff| {abs(loss - reference_loss):.2e}, max |param diff| {worst:.2e}")
    assert worst <= 1e-5
    data, fsdp, tensor = mesh_shape
    spec = tuple(q_proj_sharding.spec) + (None,) * 4
    # q_proj is [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor when they exist.
    assert (spec[1] == "fsdp") == (fsdp > 1) and (spec[2] == "tensor") == (tensor > 1), spec


def test_packed_batch_on_the_mesh_matches_single_device(packed_setup):
    model, batch = packed_setup
    reference_params, reference_loss, _ = run_one_step(model, batch, None, num_microbatches=1)
    params, loss, _ = run_one_step(model, batch, (2, 2, 2), num_microbatches=1)
    np.testing.assert_allclose(loss, reference_loss, rtol=0, atol=1e-5)
    worst = max(
        jax.tree.leaves(
            jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), params, reference_params)
        )
    )
    print(f"packed, mesh (2, 2, 2): |loss diff| {abs(loss - reference_loss):.2e}, max |param diff| {worst:.2e}")
    assert worst <= 1e-5


def test_activation_names_map_to_the_batch_and_tensor_axes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    residual = sharding.logical_to_spec(layers.RESIDUAL, (8, 16, 64), mesh)
    assert residual == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)  # the width stays whole
    assert sharding.logical_to_spec(layers.MLP, (8, 16, 172), mesh) == jax.sharding.PartitionSpec(
        ("data", "fsdp"), None, "tensor"
    )
    # Without a mesh, or outside training's activation_sharding, constrain changes nothing.
    assert sharding.activation_spec(layers.RESIDUAL, (8, 16, 64)) is None
    x = jnp.ones((8, 16, 64))
    assert layers.constrain(x, layers.RESIDUAL) is x


def test_micro_batch_gradients_in_the_compute_dtype_are_the_same_values(setup):
    """With a bfloat16 LLM, differentiating the bfloat16 copy of the weight matrices gives the
    gradients float32 weights get, bit for bit (the matmuls make them in bfloat16 either way),
    in half the bytes; norm scales, biases and the encoders keep their float32."""
    model, batch = setup
    model = avllm.AVLLM(model.config.replace(llm={"dtype": "bfloat16"}), rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter(TRAINABLE), ...)

    def grads(params):
        return jax.grad(lambda p: step.loss_sums(nnx.merge(graphdef, p, frozen), batch), has_aux=True)(params)[0]

    full = jax.jit(grads)(trainable)
    compact = jax.jit(lambda p: grads(step.compute_copy(p, jnp.bfloat16)))(trainable)
    dtypes = {optim.path_name(path): v.get_value().dtype for path, v in nnx.to_flat_state(compact)}
    assert dtypes["llm.layers.q_proj"] == dtypes["llm.lm_head"] == dtypes["audio_proj.kernel"] == jnp.bfloat16
    assert dtypes["llm.layers.input_norm.scale"] == dtypes["audio_proj.bias"] == jnp.float32
    for (path, a), (_, b) in zip(nnx.to_flat_state(full), nnx.to_flat_state(compact)):
        np.testing.assert_array_equal(
            np.asarray(a.get_value()), np.asarray(b.get_value(), np.float32), err_msg=optim.path_name(path)
        )


def test_the_step_keeps_its_state_dtypes_with_bfloat16_parameters(setup):
    """Gradients are summed in float32 and handed back in the parameters' dtype: float32
    gradients once turned bfloat16 Adam moments into float32 ones, so the second step
    recompiled and the donated state could not be reused (3 GiB more per device at 7B)."""
    model, batch = setup
    model = avllm.AVLLM(model.config.replace(llm={"param_dtype": "bfloat16"}), rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter(TRAINABLE), ...)
    optimizer = optim.make_optimizer(OPTIM, total_steps=2, params=trainable)
    state = step.TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
    new_state, _ = jax.eval_shape(step.make_train_step(graphdef, optimizer, num_microbatches=2), state, frozen, batch)
    dtypes = lambda tree: [x.dtype for x in jax.tree.leaves(tree)]
    assert jnp.bfloat16 in dtypes(state.opt_state) and dtypes(new_state) == dtypes(state)
