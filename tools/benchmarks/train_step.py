"""Training-step throughput and MFU of the full model on random weights and random batches.

    python tools/benchmark.py train_step --stage pretrain --llm vicuna_7b --batch 8
    python tools/benchmark.py train_step --stage sft --llm-layers 8 --batch 8 --remat dots

Random weights (nothing is loaded), bfloat16 parameters and compute for the networks,
float32 projectors; the step is the real jitted one from avllm_jax/training/step.py. FLOPs
follow avllm_jax/training/flops.py.
"""


def add_arguments(parser):
    parser.add_argument("--stage", choices=("pretrain", "sft"), default="pretrain", help="which weights train")
    parser.add_argument("--llm", default="vicuna_7b", help="llama preset (vicuna_7b, vicuna_13b, tiny)")
    parser.add_argument("--llm-layers", type=int, default=None, help="override the LLM depth (to fit SFT in memory)")
    parser.add_argument("--vision", default="vit_l14", help="clip_vision preset")
    parser.add_argument("--audio", default="fused", choices=("fused", "unfused"), help="CLAP HTSAT variant")
    parser.add_argument("--batch", type=int, default=8, help="global batch size")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=256)
    parser.add_argument("--remat", default="dots", help="LLM remat policy: none, dots, full")
    parser.add_argument("--attention", default="auto", help="attention implementation")
    parser.add_argument("--param-dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")


def run(args):
    import dataclasses
    import time

    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from flax import nnx

    from avllm_jax.models import avllm, clip_vision, htsat, llama
    from avllm_jax.training import flops, optim, sharding, step

    dtype = args.param_dtype
    llm_config = dataclasses.replace(
        llama.PRESETS[args.llm], vocab_size=32003, param_dtype=dtype, dtype="bfloat16", remat_policy=args.remat,
        attention_implementation=args.attention,
    )
    if args.llm_layers:
        llm_config = dataclasses.replace(llm_config, num_layers=args.llm_layers)
    audio_base = htsat.PRESETS[f"clap_htsat_{args.audio}"]
    config = avllm.AVLLMConfig(
        vision=dataclasses.replace(clip_vision.PRESETS[args.vision], param_dtype=dtype, dtype="bfloat16", attention_implementation=args.attention),
        audio=dataclasses.replace(audio_base, param_dtype=dtype, dtype="bfloat16"),
        llm=llm_config,
        modality_token_ids=(32000, 32001, 32002),
    )
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    trainable_patterns = [r"(temporal|spatial|audio)_proj\..*"] + ([r"llm\..*"] if args.stage == "sft" else [])
    optim_config = ml_collections.ConfigDict(dict(learning_rate=1e-5, warmup_fraction=0.03, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0))

    channels = 4 if config.audio.enable_fusion else 1
    rng = np.random.default_rng(0)
    b, length = args.batch, args.text_length
    input_ids = rng.integers(0, 32000, (b, length)).astype(np.int32)
    input_ids[:, min(40, length // 4)] = 32002  # <AUD_VIS> after the system prompt
    labels = np.where(np.arange(length) > length // 2, input_ids, -100).astype(np.int32)
    batch = dict(
        frames=rng.integers(0, 256, (b, args.frames, config.vision.image_size, config.vision.image_size, 3), dtype=np.uint8),
        audio_features=rng.standard_normal((b, args.segments, channels, 1001, 64), dtype=np.float32),
        audio_is_longer=np.ones((b, args.segments), bool),
        has_visual=np.arange(b) % 3 != 1,
        has_audio=np.arange(b) % 3 != 0,
        input_ids=input_ids,
        labels=labels,
        token_mask=np.ones((b, length), bool),
    )
    with jax.set_mesh(mesh):
        start = time.time()
        model = sharding.create_sharded_model(config, None, mesh, seed=0)
        graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter(trainable_patterns), ...)
        optimizer = optim.make_optimizer(optim_config, 1000, trainable)
        opt_state = jax.jit(optimizer.init, out_shardings=sharding.optimizer_shardings(optimizer, trainable, mesh))(trainable)
        state = step.TrainState(jnp.zeros((), jnp.int32), trainable, opt_state)
        train_step = step.make_train_step(graphdef, optimizer, num_microbatches=args.microbatches)
        device_batch = sharding.shard_batch(batch, mesh)
        print(f"init {time.time() - start:.1f} s; trainable {sum(x.size for x in jax.tree.leaves(trainable)):,}, "
              f"frozen {sum(x.size for x in jax.tree.leaves(frozen)):,} parameters", flush=True)
        start = time.time()
        state, metrics = train_step(state, frozen, device_batch)
        jax.block_until_ready(metrics["loss"])
        print(f"compile + first step {time.time() - start:.1f} s, loss {float(metrics['loss']):.3f}", flush=True)
        start = time.time()
        for _ in range(args.steps):
            state, metrics = train_step(state, frozen, device_batch)
        jax.block_until_ready(metrics["loss"])
        seconds = (time.time() - start) / args.steps

    sequence = length - 1 + args.frames + config.vision.num_patches + args.segments
    per_sample = flops.sample_flops(config, sequence_length=sequence, num_frames=args.frames, num_audio_segments=args.segments, llm_trains=args.stage == "sft")
    tflops = per_sample * b / seconds / jax.device_count() / 1e12
    peak = flops.peak_flops_per_device(jax.devices()[0])
    memory = jax.devices()[0].memory_stats() or {}
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(f"stage {args.stage}, LLM {args.llm} ({config.llm.num_layers} layers), batch {b}, {args.frames} frames, "
          f"{args.segments} audio segments, {length} text tokens -> {sequence} LLM tokens, remat {args.remat}, attention {args.attention}")
    print(f"step {seconds * 1000:.0f} ms, {b / seconds:.2f} samples/s, {tflops:.1f} TFLOP/s/device"
          + (f", MFU {tflops * 1e12 / peak:.1%}" if peak else ", MFU n/a (unknown peak)")
          + (f", peak memory {memory['peak_bytes_in_use'] / 2**30:.1f} GiB" if "peak_bytes_in_use" in memory else ""))
