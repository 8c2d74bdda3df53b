"""The advisor's FLOP tables: the useful share of what a step computes, packed and padded, with
attention counted the way each kernel computes it, and the packer's speed against the step's.

Attention, per LLM row of L positions (training/flops.py counts causal attention over S
positions as half of S^2 pairs; a kernel that computes a block of B x B pairs is counted as
B^2 pairs):

    xla                the whole L x L square (einsums and a boolean mask), what XLA computes
                       on CPU
    splash (TPU)       the blocks on or below the diagonal, B = 512 (256, 128 when L is not a
                       multiple): models/attention.py builds splash's block mask from a static
                       causal mask, and segment ids mask inside the blocks, so other samples'
                       blocks are computed too
    cuDNN / Pallas GPU the same causal blocks at B = 128 (cuDNN gets the segments as a dense
                       mask beside is_causal; the Pallas kernel loops over keys up to the
                       diagonal)
    segment blocks     only the blocks that hold a pair of the same sample (B = 128): what a
                       kernel that skips other segments' blocks computes (splash with a
                       per-batch block mask, cuDNN's packed-sequence offsets; not built here)

The useful work is each sample's own causal triangle, its real positions, its present media.
"""

import time

import numpy as np

KERNELS = ("xla", "splash (TPU)", "cuDNN / Pallas GPU", "segment blocks")


def _block(kernel, length):
    if kernel == "splash (TPU)":
        padded = length + (-length % 128)
        return next(b for b in (512, 256, 128) if padded % b == 0)
    return 128


def computed_pairs(kernel, length, segments):
    """Query-key pairs the kernel computes on a row of `length` positions holding samples at
    (offset, length) `segments`, as `squared_tokens` for flops.llm_attention_flops (x2: that
    function halves its argument for causal attention)."""
    if kernel == "xla":
        return 2 * length**2
    block = _block(kernel, length)
    blocks = -(-length // block)
    if kernel != "segment blocks":
        return 2 * block**2 * blocks * (blocks + 1) // 2
    hit = np.zeros((blocks, blocks), bool)
    for offset, size in segments:
        first, last = offset // block, (offset + size - 1) // block
        for q in range(first, last + 1):
            hit[q, first : q + 1] = True
    return 2 * block**2 * int(hit.sum())


def _work(samples, positions, squared, frames, items, clips, segments):
    return np.array([samples, positions, squared, frames, items, clips, segments], float)


def packed_flops(model_config, rows, budget, needs, packs, kernel, llm_trains, encoders):
    """(useful, computed) FLOPs of these packs."""
    from avllm_jax.data import packing
    from avllm_jax.training import flops

    useful = computed = 0.0
    for pack in packs:
        work = sum(packing.sample_work(needs[i], rows).astype(float) for i, *_ in pack)
        useful += flops.work_flops(model_config, work, llm_trains=llm_trains, encoders=encoders)
        pairs = sum(
            computed_pairs(kernel, budget.row_length, [(o, needs[i].length) for i, r, o in pack if r == row])
            for row in range(budget.rows)
        )
        slots = _work(
            0, budget.rows * budget.row_length, pairs, budget.frames, budget.visual_items, budget.audio_clips,
            budget.audio_clips * rows.audio,
        )  # fmt: skip
        computed += flops.work_flops(model_config, slots, llm_trains=llm_trains, encoders=encoders)
    return useful, computed


def padded_flops(model_config, rows, data, draws, kernel, llm_trains, encoders):
    """(useful, computed) FLOPs of the samples unpacked: each its own row of max_text_length - 1
    + T + N + K positions, T frames (a still repeated), an item, K audio segments."""
    from avllm_jax.data import packing
    from avllm_jax.training import flops
    from benchmarks import _mixture

    row = data.max_text_length - 1 + rows.visual() + rows.audio
    useful = computed = 0.0
    for s in draws:
        modality = _mixture.KINDS[s.kind]
        length = min(s.prompt + s.answer, data.max_text_length) - 1 + rows.count(modality)
        frames = (1 if s.kind == "image" else data.num_frames) if modality.has_visual else 0
        need = packing.Footprint(length, frames, int(modality.has_audio))
        useful += flops.work_flops(
            model_config, packing.sample_work(need, rows), llm_trains=llm_trains, encoders=encoders
        )
        slots = _work(1, row, computed_pairs(kernel, row, [(0, length)]), data.num_frames, 1, 1, rows.audio)
        computed += flops.work_flops(model_config, slots, llm_trains=llm_trains, encoders=encoders)
    return useful, computed


def report(args, config, model_config, rows, draws, results):
    from avllm_jax.training import flops

    llm_trains, encoders = flops.llm_trains(config), not config.data.feature_cache
    print(
        f"Useful share of the step's FLOPs, model as above (LLM {model_config.llm.num_layers} x "
        f"{model_config.llm.hidden_size}), LLM weights {'train' if llm_trains else 'frozen'}, encoders "
        f"{'run' if encoders else 'cached'}; attention as each kernel computes it (tools/benchmarks/_flop_share.py)\n"
    )
    print("| layout | " + " | ".join(KERNELS) + " |")
    print("|---|" + "---|" * len(KERNELS))
    shares = [padded_flops(model_config, rows, config.data, draws, k, llm_trains, encoders) for k in KERNELS]
    print("| padded (one sample a row) | " + " | ".join(f"{u / c:.1%}" for u, c in shares) + " |")
    for budget, needs, packs, _ in results:
        shares = [packed_flops(model_config, rows, budget, needs, packs, k, llm_trains, encoders) for k in KERNELS]
        label = f"packed {budget.rows}x{budget.row_length}/{budget.frames}/{budget.visual_items}/{budget.audio_clips}"
        print(f"| {label} | " + " | ".join(f"{u / c:.1%}" for u, c in shares) + " |")
    budget, needs, packs, plan_rate = results[0]
    _, computed = packed_flops(model_config, rows, budget, needs, packs, "splash (TPU)", llm_trains, encoders)
    per_pack = len([i for p in packs for i in p]) / len(packs)
    seconds_per_pack = computed / len(packs) / (args.chips * args.chip_tflops * 1e12 * args.mfu)
    consumed = per_pack / seconds_per_pack
    assemble_rate = _assemble_rate(config.data, rows, budget, needs, packs)
    print(
        f"\nStep at {budget}: {computed / len(packs) / 1e12:.3g} TFLOP a pack computed (splash); on {args.chips} chips "
        f"x {args.chip_tflops:.0f} TFLOP/s at {args.mfu:.0%} MFU it takes {consumed:,.1f} samples/s. On one core "
        f"the packer places {plan_rate:,.0f} samples/s ({plan_rate / consumed:.0f}x) and places + lays out the "
        f"arrays of {assemble_rate:,.0f} samples/s ({assemble_rate / consumed:.0f}x; decoded frames, CLAP log-mels)"
    )


def cpu_parts(model_config, work, llm_trains):
    """Computed FLOPs of a step's slot `work` by part: the LM head, LLM attention, the rest of the
    LLM (layers and projectors), the encoders."""
    from avllm_jax.training import flops

    c = model_config.llm
    positions, squared = work[1], work[2]
    head = (4 + 2 * llm_trains) * c.hidden_size * c.vocab_size * positions
    attention = flops.llm_attention_flops(c, 0, squared_tokens=squared)
    llm = flops.llm_flops(c, positions, weights_train=llm_trains, squared_tokens=squared)
    total = flops.work_flops(model_config, work, llm_trains=llm_trains)
    return {
        "LM head": head,
        "LLM attention": attention,
        "LLM layers": llm - head - attention,
        "encoders, projectors": total - llm,
    }


def _assemble_rate(data, rows, budget, needs, packs, seconds=3.0):
    """Samples a second through packer.fill + packing.assemble on one core, on arrays of the
    real sizes (one array shared by all samples, as the rate is memory copies)."""
    from avllm_jax.data import packer, packing, samples

    shapes = samples.media_shapes(data)
    media = {name: np.ones(shape, dtype) for kind in ("item", "audio") for name, (shape, dtype) in shapes[kind].items()}
    frame_name, (frame_shape, frame_dtype) = next(iter(shapes["frame"].items()))
    video = np.ones((data.num_frames, *frame_shape), frame_dtype)
    prepared = []
    for need in needs[:500]:
        text = need.length - (rows.visual() if need.frames else 0) - (rows.audio if need.audio_clips else 0) + 1
        ids = np.ones(text, np.int32)
        token_at = np.int32(0 if need.frames or need.audio_clips else -1)
        prepared.append(
            dict(
                media, input_ids=ids, labels=ids, modality_token_at=token_at, has_visual=np.bool_(need.frames > 0),
                has_audio=np.bool_(need.audio_clips > 0), **{frame_name: video[: need.frames]},
            )
        )  # fmt: skip
    window = [packing.footprint(s, rows) for s in prepared]
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        held = list(range(min(len(prepared), 32)))
        places = packer.fill([window[i] for i in held], budget)
        chosen = [prepared[held[p]] for p, _, _ in places]
        packing.assemble(chosen, [(r, o) for _, r, o in places], budget, rows, 0, shapes)
        done += len(chosen)
    return done / (time.process_time() - start)
