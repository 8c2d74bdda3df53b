"""Packing budget advisor: how full candidate budgets are on your data, without compiling.

    python tools/benchmark.py packing --config configs/sft.py                  # the LLaVA length profile
    python tools/benchmark.py packing --config configs/sft.py --instructions data/sft.jsonl
    python tools/benchmark.py packing --budgets 4x1024/256/16/8,2x2048/256/16/8 --grain

Samples are drawn from a modality mixture (`--mix`, default the paper's: Table 10's
instructions with LLaVA's images and Valley's videos) with the text lengths of an instruction
file (`--instructions`, default the LLaVA length profile of _llava_profile.py; `demo` for the
demo data), cut as the pipeline cuts them (max_text_length, and what fits a row beside the
sample's modality rows). Each budget ROWSxLENGTH/FRAMES/ITEMS/CLIPS is packed by data/packer.py
over `--window` samples (default the config's), and by today's in-order packer for comparison;
only packs filled from a full window count. It prints, per budget, the share of each budget
used, samples per pack and the truncated count, then the share of the step's FLOPs that is
useful at the config's model size (training/flops.py), with attention counted the way each
kernel computes it, beside the padded layout on the same samples, and how many samples a
second the packer places on one core against what the step consumes on `--chips` chips.
"""

import importlib.util
import time


def add_arguments(parser):
    parser.add_argument("--config", default="configs/sft.py", help="config file: media settings, budget, model")
    parser.add_argument("--instructions", default=None, help="JSONL/JSON instruction file, or 'demo'")
    parser.add_argument("--mix", default=None, help="KIND=WEIGHT,... over visual, image, audio, audio_visual")
    parser.add_argument(
        "--budgets", default=None, help="ROWSxLENGTH/FRAMES/ITEMS/CLIPS,... (default: the config's, and media matched)"
    )
    parser.add_argument("--window", type=int, default=None, help="look-ahead samples (default: the config's)")
    parser.add_argument("--samples", type=int, default=4000, help="samples drawn")
    parser.add_argument("--grain", action="store_true", help="also pack with grain's BestFit/FirstFit packers")
    parser.add_argument("--chips", type=int, default=4, help="chips the step runs on (v5p-8: 4)")
    parser.add_argument("--chip-tflops", type=float, default=459.0, help="peak bf16 TFLOP/s a chip (v5p: 459)")
    parser.add_argument("--mfu", type=float, default=0.5, help="MFU assumed for the step's computed FLOPs")


def load_config(path):
    spec = importlib.util.spec_from_file_location("advised_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_budget(text):
    from avllm_jax.data import packing

    try:
        rows_length, frames, items, clips = text.split("/")
        rows, length = rows_length.split("x")
        return packing.PackBudget(int(rows), int(length), int(frames), int(items), int(clips))
    except ValueError:
        raise SystemExit(f"--budgets: {text!r} is not ROWSxLENGTH/FRAMES/ITEMS/CLIPS") from None


def candidates(configured, draws, data, rows):
    """The config's budget, and at its row length with 1x and 2x its rows, media budgets matched
    to the data: frames and clips in proportion to the positions the samples need (rounded up),
    items with a quarter more headroom (they cost no encoder pass)."""
    import math

    from avllm_jax.data import packing

    needs = [need for need, _ in footprints(draws, data, rows, configured)]
    positions = sum(n.length for n in needs)
    out = [configured]
    for count in (configured.rows, 2 * configured.rows):
        scale = count * configured.row_length / positions
        frames = max(data.num_frames, 8 * math.ceil(scale * sum(n.frames for n in needs) / 8))
        items = math.ceil(1.25 * scale * sum(n.frames > 0 for n in needs)) + 1
        clips = math.ceil(1.25 * scale * sum(n.audio_clips for n in needs)) + 1
        out.append(packing.PackBudget(count, configured.row_length, frames, items, clips))
    return list(dict.fromkeys(out))


def footprints(draws, data, rows, budget):
    """(footprint, cut) of each drawn sample as the pipeline prepares it for this budget."""
    from avllm_jax.data import packing
    from benchmarks import _mixture

    out = []
    for s in draws:
        modality = _mixture.KINDS[s.kind]
        modality_rows = rows.count(modality)
        limit = min(data.max_text_length, budget.row_length - modality_rows + 1)
        text = s.prompt + s.answer
        frames = (1 if s.kind == "image" else data.num_frames) if modality.has_visual else 0
        out.append(
            (packing.Footprint(min(text, limit) - 1 + modality_rows, frames, int(modality.has_audio)), text > limit)
        )
    return out


def in_order(needs, budget):
    """Today's packer: samples in order, each into the first row with room, a pack closing on
    the first sample that does not fit. Packs as lists of (index, row, offset)."""
    packs, current, used, media = [], [], [0] * budget.rows, [0, 0, 0]
    for index, need in enumerate(needs):
        for _ in range(2):
            row = next((r for r, u in enumerate(used) if u + need.length <= budget.row_length), None)
            if row is not None and (
                media[0] + need.frames <= budget.frames
                and media[1] + (need.frames > 0) <= budget.visual_items
                and media[2] + need.audio_clips <= budget.audio_clips
            ):
                current.append((index, row, used[row]))
                used[row] += need.length
                media = [media[0] + need.frames, media[1] + (need.frames > 0), media[2] + need.audio_clips]
                break
            packs.append(current)
            current, used, media = [], [0] * budget.rows, [0, 0, 0]
    return packs + [current]


def full_window_packs(packs, total, window):
    """The packs filled while the window was full (the last ones drain it)."""
    out, emitted = [], 0
    for pack in packs:
        if out and emitted + window > total:
            break
        out.append(pack)
        emitted += len(pack)
    return out


def grain_packs(needs, budget, open_packs, best_fit):
    """grain's packer over the same footprints. Its bins are independent, so a pack's shared
    media budgets become each row's share (`rows` bins of frames/rows, ...), and `open_packs`
    packs' bins are filled at once. Packs as lists of (index, row, offset)."""
    import grain
    import numpy as np

    rows = budget.rows
    bins = rows * open_packs
    per_row = dict(
        tokens=budget.row_length, frames=budget.frames // rows, items=budget.visual_items // rows,
        clips=budget.audio_clips // rows, index=budget.row_length,
    )  # fmt: skip
    elements = [
        dict(
            tokens=np.zeros(n.length, np.int8), frames=np.zeros(n.frames, np.int8),
            items=np.zeros(int(n.frames > 0), np.int8), clips=np.zeros(n.audio_clips, np.int8),
            index=np.full(n.length, i, np.int32),
        )
        for i, n in enumerate(needs)
    ]  # fmt: skip
    packer_class = grain.experimental.BestFitPackIterDataset if best_fit else grain.experimental.FirstFitPackIterDataset
    dataset = packer_class(
        grain.MapDataset.source(elements).to_iter_dataset(),
        length_struct=per_row, num_packing_bins=bins, shuffle_bins=False,
    )  # fmt: skip
    emitted = []
    for row in dataset:
        segments = row["index_segment_ids"]
        emitted.append([(int(row["index"][segments == s][0]), 0, 0) for s in range(1, segments.max() + 1)])
    # `rows` bins make a pack.
    return [sum(emitted[i : i + rows], []) for i in range(0, len(emitted), rows)]


def fill_row(name, packs, needs, cuts, budget):
    import numpy as np

    def mean(f):
        return float(np.mean([f(p) for p in packs]))

    positions = mean(lambda p: sum(needs[i].length for i, *_ in p)) / (budget.rows * budget.row_length)
    frames = mean(lambda p: sum(needs[i].frames for i, *_ in p)) / max(1, budget.frames)
    items = mean(lambda p: sum(needs[i].frames > 0 for i, *_ in p)) / max(1, budget.visual_items)
    clips = mean(lambda p: sum(needs[i].audio_clips for i, *_ in p)) / max(1, budget.audio_clips)
    cut = sum(cuts[i] for p in packs for i, *_ in p)
    return f"| {name} | {mean(len):.2f} | {positions:.1%} | {frames:.1%} | {items:.1%} | {clips:.1%} | {cut} |"


def run(args):
    import numpy as np

    from avllm_jax import plan
    from avllm_jax.data import packer, packing
    from benchmarks import _flop_share, _mixture

    config = load_config(args.config)
    data = config.data
    model_config, model_source = plan.planned_model_config(config)
    rows = packing.ModalityRows.of(model_config, data)
    configured = packing.PackBudget.from_config(data.packing)
    window = args.window or data.packing.window
    mix = _mixture.parse_mix(args.mix or _mixture.PAPER_MIX)
    lengths = _mixture.text_lengths(args.instructions)
    draws = _mixture.draw_samples(args.samples, mix, lengths, text_limit=10**9)
    budgets = (
        [parse_budget(b) for b in args.budgets.split(",")]
        if args.budgets
        else candidates(configured, draws, data, rows)
    )
    print(
        f"{args.config}: {data.num_frames} frames, {data.num_audio_segments} audio segments, max_text_length "
        f"{data.max_text_length}; model from {model_source}; modality rows {rows}\n"
        f"{len(draws)} samples drawn from mix {mix} with the text lengths of {_mixture.describe(args.instructions)} "
        f"(median {np.median([p + a for p, a in lengths]):.0f} text tokens); window {window} samples\n"
    )
    print(
        "| budget (rows x length / frames / items / clips) | packer | samples/pack | positions | frames | items "
        "| clips | truncated |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for budget in budgets:
        if problem := budget.problem(rows, data.num_frames):
            print(f"| {budget} | refused: {problem} |")
            continue
        needs, cuts = zip(*footprints(draws, data, rows, budget))
        start = time.process_time()
        window_packs = packer.plan(list(needs), budget, window)
        seconds = time.process_time() - start
        layouts = {
            f"window {window}": full_window_packs(window_packs, len(needs), window),
            "in order (before)": in_order(needs, budget)[:-1],
        }
        grain_refused = False
        if args.grain:  # as many packs open as the window holds
            open_packs = max(1, round(window * len(layouts[f"window {window}"]) / len(needs)))
            r = budget.rows
            grain_refused = budget.frames // r < data.num_frames or min(budget.visual_items, budget.audio_clips) < r
            for best_fit in () if grain_refused else (True, False):
                name = f"grain {'BestFit' if best_fit else 'FirstFit'}, {open_packs} packs open"
                layouts[name] = grain_packs(needs, budget, open_packs, best_fit)[:-1]
        label = f"{budget.rows}x{budget.row_length} / {budget.frames} / {budget.visual_items} / {budget.audio_clips}"
        for name, packs in layouts.items():
            print(fill_row(name, packs, needs, cuts, budget).replace("| ", f"| {label} | ", 1))
            label = ""
        if grain_refused:
            print("|  | grain | cannot hold a video or a clip in each row's share of the media budgets |")
        results.append((budget, needs, layouts[f"window {window}"], len(needs) / seconds))
    print()
    _flop_share.report(args, config, model_config, rows, draws, results)
