"""Training-step throughput and MFU of the full model on random weights.

    python tools/benchmark.py train_step --stage pretrain --llm vicuna_7b --batch 8
    python tools/benchmark.py train_step --stage sft --llm-layers 8 --batch 8 --remat dots
    python tools/benchmark.py train_step --data mix --reduced --text-length 512      # padded vs packed

`--data random` (default): one batch of `--batch` unpacked samples, every one with all
T+N+K slots and `--text-length` tokens; MFU counts every slot.
`--data mix`: samples drawn from a modality mixture (`--mix`, default the paper's data) with
text lengths measured on an instruction file (`--instructions`, default the LLaVA length
profile of _llava_profile.py, `demo` for the demo data), packed (`--packs` packs of the
`--rows`/`--row-length`/`--pack-*` budget, data/packer.py over `--window` samples) and the
same samples padded (one row of `--text-length` text tokens and every slot each), both timed.
It prints useful answer tokens/s and useful MFU (real tokens and present media only,
flops.work_flops) beside the per-slot MFU of each layout, and what each layout computes on
this CPU by part (LM head, attention as XLA computes it, the rest).

Random weights (nothing is loaded), bfloat16 parameters and compute for the networks unless
`--reduced` (float32 on CPU), float32 projectors; the step is the real jitted one from
avllm_jax/training/step.py. Compile time is reported apart from the timed steps.
"""


def add_arguments(parser):
    parser.add_argument("--stage", choices=("pretrain", "sft"), default="pretrain", help="which weights train")
    parser.add_argument("--llm", default="vicuna_7b", help="llama preset (vicuna_7b, vicuna_13b, tiny)")
    parser.add_argument("--llm-layers", type=int, default=None, help="override the LLM depth (to fit SFT in memory)")
    parser.add_argument("--vision", default="vit_l14", help="clip_vision preset")
    parser.add_argument("--audio", default="fused", choices=("fused", "unfused"), help="CLAP HTSAT variant")
    parser.add_argument(
        "--reduced",
        action="store_true",
        help="the paper's shapes (224 px, patch 14, HTSAT's 256 spectrogram) at small widths, float32: for a CPU",
    )
    parser.add_argument("--batch", type=int, default=8, help="global batch size (samples; --data random)")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=256, help="text tokens of an unpacked sample")
    parser.add_argument("--remat", default="dots", help="LLM remat policy: none, dots, full")
    parser.add_argument("--attention", default="auto", help="attention implementation")
    parser.add_argument("--param-dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    mix = parser.add_argument_group("--data mix")
    mix.add_argument("--data", choices=("random", "mix"), default="random")
    mix.add_argument(
        "--mix", default=None, help="KIND=WEIGHT,... over visual, image, audio, audio_visual (default: the paper's)"
    )
    mix.add_argument(
        "--instructions",
        default=None,
        help="JSONL whose text lengths the samples take (default: the LLaVA length profile; 'demo': the demo data)",
    )
    mix.add_argument("--window", type=int, default=32, help="samples the packer looks ahead over")
    mix.add_argument("--packs", type=int, default=2, help="packs a step")
    mix.add_argument("--rows", type=int, default=1, help="LLM rows a pack")
    mix.add_argument("--row-length", type=int, default=2048)
    mix.add_argument("--pack-frames", type=int, default=128, help="ViT frames a pack")
    mix.add_argument("--pack-items", type=int, default=8, help="videos and images a pack")
    mix.add_argument("--pack-clips", type=int, default=4, help="audio clips a pack")


def model_config(args):
    import dataclasses

    from avllm_jax.models import avllm, clip_vision, htsat, llama

    if args.reduced:
        dtypes = dict(param_dtype="float32", dtype="float32")
        vision = dataclasses.replace(
            clip_vision.PRESETS[args.vision], hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2
        )
        audio = dataclasses.replace(
            htsat.PRESETS[f"clap_htsat_{args.audio}"], embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)
        )
        llm = dataclasses.replace(
            llama.PRESETS["tiny"],
            hidden_size=256,
            intermediate_size=688,
            num_layers=4,
            num_heads=8,
            num_kv_heads=8,
            head_dim=32,
            max_position_embeddings=4096,
        )
    else:
        dtypes = dict(param_dtype=args.param_dtype, dtype="bfloat16")
        vision, audio, llm = (
            clip_vision.PRESETS[args.vision],
            htsat.PRESETS[f"clap_htsat_{args.audio}"],
            llama.PRESETS[args.llm],
        )
    llm = dataclasses.replace(
        llm, vocab_size=32003, remat_policy=args.remat, attention_implementation=args.attention, **dtypes
    )
    if args.llm_layers:
        llm = dataclasses.replace(llm, num_layers=args.llm_layers)
    return avllm.AVLLMConfig(
        vision=dataclasses.replace(vision, attention_implementation=args.attention, **dtypes),
        audio=dataclasses.replace(audio, **dtypes),
        llm=llm,
        modality_token_ids=(32000, 32001, 32002),
    )


def random_batch(args, config):
    import numpy as np

    channels = 4 if config.audio.enable_fusion else 1
    rng = np.random.default_rng(0)
    b, length = args.batch, args.text_length
    input_ids = rng.integers(0, 32000, (b, length)).astype(np.int32)
    input_ids[:, min(40, length // 4)] = 32002  # <AUD_VIS> after the system prompt
    labels = np.where(np.arange(length) > length // 2, input_ids, -100).astype(np.int32)
    return dict(
        frames=rng.integers(
            0, 256, (b, args.frames, config.vision.image_size, config.vision.image_size, 3), dtype=np.uint8
        ),
        audio_features=rng.standard_normal((b, args.segments, channels, 1001, 64), dtype=np.float32),
        audio_is_longer=np.ones((b, args.segments), bool),
        has_visual=np.arange(b) % 3 != 1,
        has_audio=np.arange(b) % 3 != 0,
        input_ids=input_ids,
        labels=labels,
        token_mask=np.ones((b, length), bool),
    )


def time_step(config, args, batch, label):
    """(seconds a step, work summed over the batch, loss) of the real step on `batch`."""
    run_steps = compiled_step(config, args, batch, label)
    wall, _, work, loss = run_steps(args.steps)
    return wall / args.steps, work, loss


def compiled_step(config, args, batch, label):
    """The real step on `batch`, compiled and run once: a function that runs it `count` more
    times and returns (wall seconds, CPU seconds of this process, work summed over the batch, loss)."""
    import time

    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from avllm_jax.training import optim, sharding, step

    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    trainable_patterns = [r"(temporal|spatial|audio)_proj\..*"] + ([r"llm\..*"] if args.stage == "sft" else [])
    optim_config = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-5,
            warmup_fraction=0.03,
            beta1=0.9,
            beta2=0.98,
            eps=1e-8,
            weight_decay=0.0,
            max_grad_norm=1.0,
            final_learning_rate=0.0,
        )
    )
    with jax.set_mesh(mesh):
        start = time.time()
        model = sharding.create_sharded_model(config, None, mesh, seed=0)
        graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter(trainable_patterns), ...)
        optimizer = optim.make_optimizer(optim_config, 1000, trainable)
        opt_state = jax.jit(optimizer.init, out_shardings=sharding.optimizer_shardings(optimizer, trainable, mesh))(
            trainable
        )
        state = step.TrainState(jnp.zeros((), jnp.int32), trainable, opt_state)
        train_step = step.make_train_step(graphdef, optimizer, num_microbatches=args.microbatches)
        device_batch = sharding.shard_batch(batch, mesh)
        print(
            f"[{label}] init {time.time() - start:.1f} s; trainable "
            f"{sum(x.size for x in jax.tree.leaves(trainable)):,}, "
            f"frozen {sum(x.size for x in jax.tree.leaves(frozen)):,} parameters",
            flush=True,
        )
        start = time.time()
        state, metrics = train_step(state, frozen, device_batch)
        jax.block_until_ready(metrics["loss"])
        print(
            f"[{label}] compile + first step {time.time() - start:.1f} s, loss {float(metrics['loss']):.3f}", flush=True
        )
    carried = {"state": state}

    def run_steps(count):
        with jax.set_mesh(mesh):
            start, cpu = time.time(), time.process_time()
            for _ in range(count):
                carried["state"], metrics = train_step(carried["state"], frozen, device_batch)
            jax.block_until_ready(metrics["loss"])
            wall, cpu = time.time() - start, time.process_time() - cpu
        return wall, cpu, jax.device_get(metrics["work"]), float(metrics["loss"])

    return run_steps


def run(args):
    import jax

    from avllm_jax.training import flops

    config = model_config(args)
    peak = flops.peak_flops_per_device(jax.devices()[0])
    llm_trains = args.stage == "sft"
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; stage {args.stage}, LLM "
        f"{config.llm.num_layers} layers "
        f"x {config.llm.hidden_size}, {args.frames} frames, {args.segments} audio segments, remat {args.remat}, "
        f"attention {args.attention}"
    )
    if args.data == "mix":
        return run_mix(args, config, peak, llm_trains)
    sequence = args.text_length - 1 + args.frames + config.vision.num_patches + args.segments
    seconds, _, _ = time_step(config, args, random_batch(args, config), "random")
    per_sample = flops.sample_flops(
        config,
        sequence_length=sequence,
        num_frames=args.frames,
        num_audio_segments=args.segments,
        llm_trains=llm_trains,
    )
    tflops = per_sample * args.batch / seconds / jax.device_count() / 1e12
    memory = jax.devices()[0].memory_stats() or {}
    print(f"batch {args.batch}, {args.text_length} text tokens -> {sequence} LLM tokens")
    print(
        f"step {seconds * 1000:.0f} ms, {args.batch / seconds:.2f} samples/s, {tflops:.1f} TFLOP/s/device"
        + (f", MFU {tflops * 1e12 / peak:.1%}" if peak else ", MFU n/a (unknown peak)")
        + (f", peak memory {memory['peak_bytes_in_use'] / 2**30:.1f} GiB" if "peak_bytes_in_use" in memory else "")
    )


def run_mix(args, config, peak, llm_trains):
    import jax
    import numpy as np

    from avllm_jax.data import packing
    from avllm_jax.training import flops
    from benchmarks import _flop_share, _mixture

    mix = _mixture.parse_mix(args.mix or _mixture.PAPER_MIX)
    lengths = _mixture.text_lengths(args.instructions)
    answers = np.array([a for _, a in lengths])
    print(
        f"mix {mix}; {len(lengths)} instruction samples from {_mixture.describe(args.instructions)}: "
        f"answer tokens mean {answers.mean():.1f}, median {np.median(answers):.0f}, max {answers.max()}; "
        f"prompt tokens mean {np.mean([p for p, _ in lengths]):.1f}"
    )
    rows = packing.ModalityRows(args.frames, config.vision.num_patches, args.segments)
    budget = packing.PackBudget(args.rows, args.row_length, args.pack_frames, args.pack_items, args.pack_clips)
    if problem := budget.problem(rows, args.frames):
        raise SystemExit(f"packing budget: {problem}")
    channels = 4 if config.audio.enable_fusion else 1
    audio_shape = (args.segments, channels, 1001, 64)
    size = config.vision.image_size
    draws = _mixture.draw_samples(
        (args.packs + _mixture.WARM_UP_PACKS) * 64 + 2 * args.window, mix, lengths, args.text_length
    )
    rng = np.random.default_rng(1)
    samples = [
        _mixture.prepared(s, rng, num_frames=args.frames, image_size=size, audio_shape=audio_shape) for s in draws
    ]
    shapes = {
        "frame": {"frames": ((size, size, 3), np.uint8)},
        "item": {},
        "audio": {"audio_features": (audio_shape, np.float32), "audio_is_longer": (audio_shape[:1], bool)},
    }
    packed, used = _mixture.packed_batch(samples, budget, args.packs, rows, shapes, args.window)
    # The padded layout runs the same samples, so that both layouts' answer tokens are the same.
    padded = _mixture.padded_batch(used, args.text_length, args.frames, rows)
    padded_sequence = args.text_length - 1 + args.frames + config.vision.num_patches + args.segments
    n = len(used)
    slot_work = {
        "padded": (n, n * padded_sequence, n * padded_sequence**2, n * args.frames, n, n, n * args.segments),
        "packed": (
            0,
            args.packs * budget.rows * budget.row_length,
            args.packs * budget.rows * budget.row_length**2,
            args.packs * budget.frames,
            args.packs * budget.visual_items,
            args.packs * budget.audio_clips,
            args.packs * budget.audio_clips * args.segments,
        ),
    }
    # What XLA computes on this CPU: every row's whole square of attention.
    row_squares = {"padded": n * padded_sequence**2, "packed": args.packs * budget.rows * budget.row_length**2}
    # Both compiled first, then their steps alternate, so that both see the same load.
    steppers = {
        "padded": compiled_step(config, args, padded, "padded"),
        "packed": compiled_step(config, args, packed, "packed"),
    }
    timed = {name: [0.0, 0.0] for name in steppers}
    for _ in range(args.steps):
        for name, run_steps in steppers.items():
            wall, cpu, work, _ = run_steps(1)
            timed[name] = [timed[name][0] + wall / args.steps, timed[name][1] + cpu / args.steps]
            timed[name + " work"] = work
    results = {}
    for name in steppers:
        work_slots = np.array(slot_work[name], float)
        computed = work_slots.copy()
        computed[2] = 2 * row_squares[name]
        results[name] = dict(
            seconds=timed[name][0],
            cpu_seconds=timed[name][1],
            answers=_mixture.answer_tokens(used),
            useful=flops.work_flops(config, timed[name + " work"], llm_trains=llm_trains),
            slots=flops.work_flops(config, work_slots, llm_trains=llm_trains),
            parts=_flop_share.cpu_parts(config, computed, llm_trains),
        )
    devices = jax.device_count()
    print(f"\n{n} samples: padded, rows of {padded_sequence}; packed, {args.packs} packs of {budget}")
    print(
        "| layout | samples/step | step (wall) | step (CPU time) | answer tok/s (wall) | useful TFLOP/s/device "
        "| useful MFU | slot MFU | useful share of slots |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        useful_tflops = r["useful"] / r["seconds"] / devices / 1e12
        mfu = (lambda flops_, r=r: f"{flops_ / r['seconds'] / devices / peak:.1%}") if peak else (lambda _: "n/a")
        print(
            f"| {name} | {n} | {r['seconds'] * 1000:.0f} ms | {r['cpu_seconds'] * 1000:.0f} ms | "
            f"{r['answers'] / r['seconds']:.1f} | {useful_tflops:.4f} | {mfu(r['useful'])} | {mfu(r['slots'])} | "
            f"{r['useful'] / r['slots']:.1%} |"
        )
    # The same samples in both layouts: the answer tokens/s ratio is the ratio of step times.
    wall = results["padded"]["seconds"] / results["packed"]["seconds"]
    cpu = results["padded"]["cpu_seconds"] / results["packed"]["cpu_seconds"]
    print(f"packed / padded useful answer tokens/s: {wall:.2f}x by wall time, {cpu:.2f}x by CPU time")
    for name, r in results.items():
        total = sum(r["parts"].values())
        print(
            f"{name}: computed on this CPU {total / 1e9:.0f} GFLOP a step (attention as whole squares): "
            + ", ".join(f"{part} {value / total:.0%}" for part, value in r["parts"].items())
            + f"; useful {r['useful'] / total:.0%}"
        )
