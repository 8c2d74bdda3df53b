"""Causal self-attention: time, achieved TFLOP/s and memory of each implementation.

`python tools/benchmark.py attention` times every implementation the current backend offers
('xla' everywhere, 'cudnn' and 'pallas' on NVIDIA GPUs, 'pallas' (splash) on TPUs) for
sequences of 2048 and 4096, 32 heads of dimension 128, bfloat16, forward and forward+backward.
On CPU, `--seq 256` is a quick smoke test.

FLOP convention (FlashAttention's): the forward pass is 4·B·H·S²·D (two matmuls), halved
for causal attention; the backward pass counts 2.5 forward passes (five matmuls, recomputing
the logits), so forward+backward counts 3.5 forward passes. Masked work that a kernel skips or
does anyway is not counted either way.

Memory: 'temp' is the scratch memory XLA plans for that one compiled call (inputs and outputs
excluded); 'peak' is the device's `peak_bytes_in_use` so far in this process (it never goes
down, so it bounds every earlier row too), 'n/a' where the device does not report it.
"""

from __future__ import annotations

import time

BACKWARD_FACTOR = 2.5


def add_arguments(parser):
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--impl",
        nargs="+",
        default=None,
        help="implementations to time (default: those the backend offers; 'pallas' on CPU is interpret mode)",
    )
    parser.add_argument(
        "--padded",
        action="store_true",
        help="pass segment ids with the last eighth of every sequence as padding (segment 0)",
    )
    parser.add_argument("--iters", type=int, default=10, help="timed calls per row")


def available_implementations() -> list[str]:
    import jax

    device = jax.devices()[0]
    if device.platform == "gpu" and "cuda" in device.client.platform_version.lower():
        return ["xla", "cudnn", "pallas"]
    if device.platform == "gpu":
        return ["xla", "pallas"]
    if device.platform == "tpu":
        return ["xla", "pallas"]
    return ["xla"]


def attention_flops(batch, heads, seq, head_dim, backward):
    forward = 4 * batch * heads * seq * seq * head_dim / 2  # causal: half the score matrix
    return forward * (1 + BACKWARD_FACTOR) if backward else forward


def _mib(num_bytes):
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.0f}"


def _time_call(compiled, args, iters):
    import jax

    jax.block_until_ready(compiled(*args))  # warm-up: first-call overheads and autotuning
    start = time.perf_counter()
    for _ in range(iters):
        result = compiled(*args)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / iters


def run(args):
    import jax
    import jax.numpy as jnp

    from avllm_jax.models import attention

    device = jax.devices()[0]
    implementations = args.impl or available_implementations()
    dtype = jnp.dtype(args.dtype)
    kv_heads = args.kv_heads or args.heads
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, {len(jax.devices())} devices")
    print(
        f"causal attention, batch {args.batch}, {args.heads} query / {kv_heads} key-value heads, head dim "
        f"{args.head_dim}, {args.dtype}, {'segment ids with padding' if args.padded else 'no segment ids'}; "
        f"FLOPs: forward 2·B·H·S²·D (causal half of 4·B·H·S²·D), forward+backward {1 + BACKWARD_FACTOR}x that"
    )
    header = f"{'impl':>7} {'seq':>6} {'pass':>8} {'ms':>9} {'TFLOP/s':>8} {'temp MiB':>9} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for seq in args.seq:
        keys = jax.random.split(jax.random.key(seq), 4)
        query = jax.random.normal(keys[0], (args.batch, seq, args.heads, args.head_dim), dtype)
        key = jax.random.normal(keys[1], (args.batch, seq, kv_heads, args.head_dim), dtype)
        value = jax.random.normal(keys[2], (args.batch, seq, kv_heads, args.head_dim), dtype)
        cotangent = jax.random.normal(keys[3], query.shape, dtype)
        segment_ids = None
        if args.padded:
            segment_ids = (jnp.arange(seq) < seq - seq // 8).astype(jnp.int32)[None].repeat(args.batch, 0)
        for implementation in implementations:

            def forward(query, key, value, implementation=implementation):
                return attention.dot_product_attention(
                    query,
                    key,
                    value,
                    query_segment_ids=segment_ids,
                    kv_segment_ids=segment_ids,
                    causal=True,
                    implementation=implementation,
                )

            def forward_backward(query, key, value, cotangent, forward=forward):
                output, vjp = jax.vjp(forward, query, key, value)
                return output, vjp(cotangent)

            for name, function, inputs in (
                ("fwd", forward, (query, key, value)),
                ("fwd+bwd", forward_backward, (query, key, value, cotangent)),
            ):
                row = f"{implementation:>7} {seq:>6} {name:>8}"
                try:
                    compiled = jax.jit(function).lower(*inputs).compile()
                    seconds = _time_call(compiled, inputs, args.iters)
                except Exception as error:  # one failing kernel must not hide the others' numbers
                    print(f"{row} failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
                    continue
                memory = compiled.memory_analysis()
                temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
                stats = device.memory_stats() or {}
                tflops = attention_flops(args.batch, args.heads, seq, args.head_dim, name != "fwd") / seconds / 1e12
                print(
                    f"{row} {seconds * 1e3:>9.3f} {tflops:>8.3g} {_mib(temp):>9} "
                    f"{_mib(stats.get('peak_bytes_in_use')):>9}",
                    flush=True,
                )
