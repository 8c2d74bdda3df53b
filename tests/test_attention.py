"""Every attention implementation against the 'xla' reference: outputs and gradients.

On CPU the Pallas kernels run in interpret mode (the GPU flash kernel and TPU splash
attention). With JAX_PLATFORMS=cuda (tools/gpu_attention_check.sh) the same tests run the real
GPU kernels, and the cuDNN tests run too.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avllm_jax.models import attention

BACKEND = jax.devices()[0].platform
ON_NVIDIA = BACKEND == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()
INTERPRET = BACKEND == "cpu"

# Largest |difference| allowed, as a fraction of the largest |reference value|. float32 on CPU
# differs only by summation order. On GPU, float32 kernel matmuls run in TF32 (10-bit
# mantissa). bfloat16 rounds the softmax weights to 8 bits in both implementations, at
# different points.
TOLERANCE = {jnp.float32: 2e-5 if BACKEND == "cpu" else 1e-2, jnp.bfloat16: 3e-2}


def make_inputs(batch, length, heads, kv_heads, head_dim, dtype, seed=0, kv_length=None):
    keys = jax.random.split(jax.random.key(seed), 4)
    kv_length = kv_length or length
    query = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32).astype(dtype)
    key = jax.random.normal(keys[1], (batch, kv_length, kv_heads, head_dim), jnp.float32).astype(dtype)
    value = jax.random.normal(keys[2], (batch, kv_length, kv_heads, head_dim), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(keys[3], (batch, length, heads, head_dim), jnp.float32)
    return query, key, value, cotangent


def make_segment_ids(batch, length, layout):
    """None; 'padded': sample 1 ends in padding; 'absent': a run of 0s mid-sequence (a missing modality)."""
    if layout is None:
        return None
    ids = np.ones((batch, length), np.int32)
    if layout == "padded":
        ids[1 % batch, length - length // 3 :] = 0
    elif layout == "absent":
        ids[:, length // 4 : length // 2] = 0
        ids[0, -2:] = 0
    return jnp.asarray(ids)


def output_and_grads(attend, query, key, value, cotangent):
    def loss(query, key, value):
        output = attend(query, key, value)
        return jnp.sum(output.astype(jnp.float32) * cotangent), output

    grads, output = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(query, key, value)
    return (output, *grads)


def assert_matches_reference(actual, expected, dtype):
    assert len(actual) == len(expected)
    for name, a, e in zip(("output", "dq", "dk", "dv"), actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, (name, a.shape, e.shape, a.dtype, e.dtype)
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.all(np.isfinite(a)), f"{name} has non-finite values"
        error, scale = np.max(np.abs(a - e)), np.max(np.abs(e))
        assert error <= TOLERANCE[dtype] * scale, f"{name}: max error {error:.3g} vs max |value| {scale:.3g}"


def reference(query, key, value, cotangent, segment_ids, causal, query_offset=0):
    def attend(q, k, v):
        return attention.dot_product_attention(
            q,
            k,
            v,
            query_segment_ids=segment_ids,
            kv_segment_ids=segment_ids,
            causal=causal,
            query_offset=query_offset,
            implementation="xla",
        )

    return jax.jit(output_and_grads, static_argnums=0)(attend, query, key, value, cotangent)


# (dtype, batch, length, heads, kv_heads, head_dim, segment layout, causal). The GPU flash
# kernel runs with 16-wide blocks here so that 40 is not a multiple of the block size.
FLASH_CASES = [
    (jnp.float32, 2, 40, 4, 2, 32, "padded", True),
    (jnp.bfloat16, 2, 40, 4, 2, 32, "padded", True),
    (jnp.float32, 1, 40, 2, 2, 16, None, False),
    (jnp.float32, 2, 32, 4, 1, 32, "absent", True),
]
if not INTERPRET:
    FLASH_CASES += [
        (jnp.bfloat16, 2, 300, 8, 2, 128, "absent", True),
        (jnp.bfloat16, 1, 1024, 8, 8, 128, None, True),
        (jnp.float32, 2, 200, 4, 4, 64, "padded", False),
    ]


@pytest.mark.skipif(BACKEND == "tpu", reason="the Triton kernel runs on GPU, or in interpret mode on CPU")
@pytest.mark.parametrize("dtype,batch,length,heads,kv_heads,head_dim,layout,causal", FLASH_CASES)
def test_gpu_flash_kernel_matches_xla(dtype, batch, length, heads, kv_heads, head_dim, layout, causal):
    query, key, value, cotangent = make_inputs(batch, length, heads, kv_heads, head_dim, dtype)
    segment_ids = make_segment_ids(batch, length, layout)
    block_size = 16 if INTERPRET else None

    def attend(q, k, v):
        return attention._flash_attention_gpu(q, k, v, segment_ids, causal, interpret=INTERPRET, block_size=block_size)

    actual = jax.jit(output_and_grads, static_argnums=0)(attend, query, key, value, cotangent)
    assert_matches_reference(actual, reference(query, key, value, cotangent, segment_ids, causal), dtype)


SPLASH_CASES = [
    (jnp.float32, 2, 200, 4, 2, 32, "padded", True),
    (jnp.bfloat16, 2, 200, 4, 2, 32, "absent", True),
    (jnp.float32, 1, 100, 2, 1, 32, None, False),
]


@pytest.mark.skipif(BACKEND == "gpu", reason="splash attention runs on TPU, or in interpret mode on CPU")
@pytest.mark.parametrize("dtype,batch,length,heads,kv_heads,head_dim,layout,causal", SPLASH_CASES)
def test_splash_attention_matches_xla(dtype, batch, length, heads, kv_heads, head_dim, layout, causal):
    query, key, value, cotangent = make_inputs(batch, length, heads, kv_heads, head_dim, dtype)
    segment_ids = make_segment_ids(batch, length, layout)

    def attend(q, k, v):
        return attention._splash_attention(q, k, v, segment_ids, segment_ids, causal, interpret=INTERPRET)

    actual = jax.jit(output_and_grads, static_argnums=0)(attend, query, key, value, cotangent)
    assert_matches_reference(actual, reference(query, key, value, cotangent, segment_ids, causal), dtype)


def scanned_layers(implementation, query, key, value, segment_ids):
    """Two 'layers' of attention in a rematerialised lax.scan, as a model runs them."""
    layer_scales = jnp.array([1.0, 0.5], query.dtype)

    @jax.checkpoint
    def layer(query, scale):
        output = attention.dot_product_attention(
            query,
            key * scale,
            value,
            query_segment_ids=segment_ids,
            kv_segment_ids=segment_ids,
            causal=True,
            implementation=implementation,
        )
        return query + output, None

    return jax.lax.scan(layer, query, layer_scales)[0]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices for a (2, 2, 2) mesh")
def test_pallas_under_jit_scan_remat_and_fsdp_mesh(caplog):
    caplog.set_level(logging.INFO, logger="avllm_jax")
    dtype = jnp.float32
    attention._logged.clear()
    query, key, value, cotangent = make_inputs(4, 24, 4, 2, 16, dtype, seed=1)
    segment_ids = make_segment_ids(4, 24, "padded")
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    heads_sharding = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor", None))
    with jax.set_mesh(mesh):
        query, key, value = (jax.device_put(x, heads_sharding) for x in (query, key, value))
        results = {}
        for implementation in ("xla", "pallas"):
            attend = lambda q, k, v, impl=implementation: scanned_layers(impl, q, k, v, segment_ids)
            results[implementation] = jax.jit(output_and_grads, static_argnums=0)(attend, query, key, value, cotangent)
    assert "computes this call with 'xla'" not in caplog.text  # the kernel really ran
    assert_matches_reference(results["pallas"], results["xla"], dtype)


@pytest.mark.skipif(jax.device_count() < 8 or BACKEND == "gpu", reason="splash on a (2, 2, 2) mesh: CPU or TPU")
def test_splash_under_fsdp_mesh():
    dtype = jnp.float32
    query, key, value, cotangent = make_inputs(4, 128, 2, 1, 16, dtype, seed=2)
    segment_ids = make_segment_ids(4, 128, "absent")
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)

    def attend(q, k, v):
        return attention._splash_attention(q, k, v, segment_ids, segment_ids, True, interpret=INTERPRET)

    with jax.set_mesh(mesh):
        actual = jax.jit(output_and_grads, static_argnums=0)(attend, query, key, value, cotangent)
    assert_matches_reference(actual, reference(query, key, value, cotangent, segment_ids, True), dtype)


def test_pallas_falls_back_to_xla_for_decoding_with_offset(caplog):
    caplog.set_level(logging.INFO, logger="avllm_jax")
    # A decoding step (one query against a partly filled cache) is outside the kernels' scope;
    # 'pallas' must still give the reference answer, and say once that it used 'xla'.
    query, key, value, _ = make_inputs(2, 1, 4, 2, 16, jnp.float32, kv_length=12)
    segment_ids = make_segment_ids(2, 12, "padded")
    kwargs = dict(query_segment_ids=segment_ids[:, 7:8], kv_segment_ids=segment_ids, causal=True, query_offset=7)
    attention._logged.clear()
    actual = attention.dot_product_attention(query, key, value, implementation="pallas", **kwargs)
    expected = attention.dot_product_attention(query, key, value, implementation="xla", **kwargs)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=0)
    attention.dot_product_attention(query, key, value, implementation="pallas", **kwargs)
    assert caplog.text.count("computes this call with 'xla'") == 1


@pytest.mark.skipif(ON_NVIDIA, reason="checks the error raised without an NVIDIA GPU")
def test_cudnn_without_gpu_fails_clearly():
    query, key, value, _ = make_inputs(1, 8, 2, 2, 16, jnp.bfloat16)
    with pytest.raises(
        ValueError, match="'cudnn' needs an NVIDIA GPU.*found 'cpu'" if BACKEND == "cpu" else "NVIDIA GPU"
    ):
        attention.dot_product_attention(query, key, value, causal=True, implementation="cudnn")


def test_resolve_implementation(caplog):
    caplog.set_level(logging.INFO, logger="avllm_jax")
    expected_auto = "cudnn" if ON_NVIDIA else "pallas" if BACKEND == "tpu" else "xla"
    attention._logged.clear()
    assert attention.resolve_implementation("auto") == expected_auto
    assert attention.resolve_implementation("auto") == expected_auto
    assert attention.resolve_implementation("xla") == "xla"
    printed = caplog.text
    assert printed.count("'auto' ->") == 1, printed  # once, however often it is resolved
    assert f"on {'nvidia' if ON_NVIDIA else BACKEND}" in printed
    with pytest.raises(ValueError, match="not one of"):
        attention.resolve_implementation("flash")


@pytest.mark.parametrize(
    "dtype,length,uses_cudnn",
    [(jnp.bfloat16, 8, True), (jnp.bfloat16, 1, False), (jnp.float32, 8, False)],
    ids=["bfloat16 prefill", "single-token decoding", "float32"],
)
def test_auto_on_nvidia_uses_cudnn_only_where_it_helps(monkeypatch, dtype, length, uses_cudnn):
    # Pretend to be on an NVIDIA GPU, where 'auto' means 'cudnn', and record whether the cuDNN
    # path is taken; everything computes with 'xla', so this runs on any machine.
    device = jax.devices()[0]
    monkeypatch.setattr(attention, "_backend", lambda: ("nvidia", device))
    cudnn_calls = []

    def fake_cudnn(query, key, value, query_segment_ids, kv_segment_ids, causal, query_offset):
        cudnn_calls.append(query.shape)
        mask = attention.attention_mask(
            query.shape[1], key.shape[1], None, None, causal=causal, query_offset=query_offset
        )
        return attention._xla_attention(query, key, value, mask)

    monkeypatch.setattr(attention, "_cudnn_attention", fake_cudnn)
    query, key, value, _ = make_inputs(1, length, 2, 2, 16, dtype, kv_length=8)
    kwargs = dict(causal=True, query_offset=8 - length)
    actual = attention.dot_product_attention(query, key, value, implementation="auto", **kwargs)
    expected = attention.dot_product_attention(query, key, value, implementation="xla", **kwargs)
    assert bool(cudnn_calls) == uses_cudnn
    np.testing.assert_array_equal(np.asarray(actual, np.float32), np.asarray(expected, np.float32))


CUDNN_CASES = [
    (2, 64, 4, 2, 64, "padded", True),
    (2, 301, 8, 2, 128, "absent", True),  # odd length with a mask: padded to even inside
    (1, 1024, 8, 8, 128, None, True),
    (2, 128, 4, 4, 128, "padded", False),
]


@pytest.mark.skipif(not ON_NVIDIA, reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("batch,length,heads,kv_heads,head_dim,layout,causal", CUDNN_CASES)
def test_cudnn_matches_xla(batch, length, heads, kv_heads, head_dim, layout, causal):
    dtype = jnp.bfloat16
    query, key, value, cotangent = make_inputs(batch, length, heads, kv_heads, head_dim, dtype)
    segment_ids = make_segment_ids(batch, length, layout)

    def attend(q, k, v):
        return attention.dot_product_attention(
            q,
            k,
            v,
            query_segment_ids=segment_ids,
            kv_segment_ids=segment_ids,
            causal=causal,
            implementation="cudnn",
        )

    actual = jax.jit(output_and_grads, static_argnums=0)(attend, query, key, value, cotangent)
    assert_matches_reference(actual, reference(query, key, value, cotangent, segment_ids, causal), dtype)


@pytest.mark.skipif(not ON_NVIDIA, reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_prefill_into_longer_cache_matches_xla():
    # Queries at slots 8..15 of a 32-slot cache: the causal mask is shifted, so it is folded
    # into the boolean mask rather than cuDNN's own causal mask.
    query, key, value, _ = make_inputs(2, 8, 4, 2, 64, jnp.bfloat16, kv_length=32)
    segment_ids = make_segment_ids(2, 32, "padded")
    kwargs = dict(query_segment_ids=segment_ids[:, 8:16], kv_segment_ids=segment_ids, causal=True, query_offset=8)
    actual = attention.dot_product_attention(query, key, value, implementation="cudnn", **kwargs)
    expected = attention.dot_product_attention(query, key, value, implementation="xla", **kwargs)
    assert_matches_reference([actual], [expected], jnp.bfloat16)


@pytest.mark.skipif(not ON_NVIDIA, reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_rejects_float32_clearly():
    query, key, value, _ = make_inputs(1, 8, 2, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attention.dot_product_attention(query, key, value, implementation="cudnn")


def test_llama_logits_with_pallas_equal_xla(caplog):
    caplog.set_level(logging.INFO, logger="avllm_jax")
    from flax import nnx

    from avllm_jax.models import llama

    input_ids = jax.random.randint(jax.random.key(3), (2, 24), 0, llama.PRESETS["tiny"].vocab_size)
    segment_ids = make_segment_ids(2, 24, "absent")
    logits = {}
    attention._logged.clear()
    for implementation in ("xla", "pallas"):
        config = dataclasses.replace(llama.PRESETS["tiny"], attention_implementation=implementation)
        model = llama.Llama(config, rngs=nnx.Rngs(0))  # the same weights for both
        forward = nnx.jit(lambda model, ids, segments: model(ids, segment_ids=segments))
        logits[implementation] = forward(model, input_ids, segment_ids)
    assert "computes this call with 'xla'" not in caplog.text  # the kernel really ran
    error = np.max(np.abs(logits["pallas"] - logits["xla"]))
    assert error <= TOLERANCE[jnp.float32] * np.max(np.abs(logits["xla"])), error
