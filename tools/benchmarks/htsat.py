"""HTSAT forward (CLAP audio encoder): jitted JAX vs HF PyTorch ClapAudioModel, same weights.

Times a batch of 10 s segments (default: 4, the default CLAP config) through both and prints
the median of several runs of each and their ratio. Compilation is timed separately.
"""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--segments", type=int, default=4, help="segments per forward (batch)")
    parser.add_argument("--fused", action="store_true", help="the fused CLAP variant (4-channel features)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")


def run(args) -> None:
    import statistics
    import tempfile
    import time

    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from avllm_jax.data.features import clap_audio_features
    from avllm_jax.models import htsat
    from avllm_jax.models.conversion import checkpoint_files, convert_tensors, flat_shapes, iterate_tensors, load_into

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_model = transformers.ClapAudioModel(transformers.ClapAudioConfig(enable_fusion=args.fused)).eval()
    config = htsat.PRESETS["clap_htsat_fused" if args.fused else "clap_htsat_unfused"]
    model = nnx.eval_shape(lambda: htsat.HTSAT(config, rngs=nnx.Rngs(0)))
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        tensors = iterate_tensors(checkpoint_files(directory))
        load_into(model, convert_tensors(tensors, htsat.hf_rules(config), flat_shapes(nnx.state(model))))

    waveforms = np.random.default_rng(0).standard_normal((args.segments, 13 * 48_000)).astype(np.float32) * 0.1
    features, is_longer = clap_audio_features(
        waveforms, truncation="fusion" if args.fused else "rand_trunc", rng=np.random.default_rng(0)
    )
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x, longer: nnx.merge(graphdef, state)(x, longer))

    start = time.perf_counter()
    compiled = forward.lower(state, features, is_longer).compile()
    compile_s = time.perf_counter() - start

    def time_jax():
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, features, is_longer))
        return time.perf_counter() - start

    torch_features, torch_longer = torch.from_numpy(features), torch.from_numpy(is_longer)[:, None]

    def time_torch():
        start = time.perf_counter()
        with torch.no_grad():
            hf_model(torch_features, is_longer=torch_longer)
        return time.perf_counter() - start

    time_jax(), time_torch()  # warm-up
    # interleaved, so that load from other processes hits both alike
    jax_times, torch_times = [], []
    for _ in range(args.repeats):
        jax_times.append(time_jax())
        torch_times.append(time_torch())
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    print(
        f"HTSAT ({'fused' if args.fused else 'unfused'}), {args.segments} x 10 s segments, "
        f"features {tuple(features.shape)}, {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}"
    )
    print(f"  jax compile      {compile_s:8.2f} s")
    print(f"  jax forward      {jax_s * 1e3:8.1f} ms  (median of {args.repeats}; min {min(jax_times) * 1e3:.1f})")
    print(f"  pytorch forward  {torch_s * 1e3:8.1f} ms  (median of {args.repeats}; min {min(torch_times) * 1e3:.1f})")
    print(f"  pytorch / jax    {torch_s / jax_s:8.2f}x")
