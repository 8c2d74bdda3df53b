"""The paper's Table 4 in miniature: `python tools/ablate.py table4` (or `make ablate`).

Trains configs/demo.py's stage 2 as MAT (every modality mixed in each batch), PT1 (audio-visual
samples first, then visual and audio ones) and PT2 (the other way round), with the phases of
configs/ablations/table4_pt1.py and table4_pt2.py, each with the same steps and, per seed, the
same seed, on the demo data set. As in the paper, every row starts from the same stage 1 (the
demo's: tools/demo.py's stand-in and stage 1, built once under --out and shared by every run).
Each run is scored on the same held-out split; MAT is scored once more with the visual stream
alone (the paper's Figure 8). Each run lies in OUT/ablate/<row>_seed<k>, with
its scores in eval.json: rerunning skips what is done.

Prints, per row, the mean and standard deviation over the seeds of exact match per question
group (visual, audio, audio-visual, cross-modal timing), on the whole held-out split and on
its unseen combinations, then each seed's figures.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import demo  # tools/demo.py: data, tokenizer, training and scoring

from avllm_jax import cli

ROWS = ("MAT", "PT1", "PT2")
VISUAL_ONLY = "MAT, visual only at evaluation"
ABLATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "ablations")


@cli.entry_point
def main(argv=None):
    parser = cli.Parser("python tools/ablate.py", __doc__)
    parser.add_argument("table", choices=["table4"], help="the paper's table to reproduce")
    parser.add_argument(
        "--out", default="demo_out", help="the demo's directory: its data and tokenizer, and ablate/ (default demo_out)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument(
        "--steps", type=int, default=None, help="stage 2 steps of every run (default: the demo's, configs/demo.py)"
    )
    parser.add_argument("--num-train", type=int, default=3000, help="training clips, if the data is not written yet")
    parser.add_argument("--num-eval", type=int, default=300, help="held-out clips, if the data is not written yet")
    args = parser.parse_args(argv)
    cli.configure_logging(args)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    start = time.time()

    from avllm_jax.training.config import load_config_file

    paths = demo.prepare(args.out, args.num_train, args.num_eval)
    demo.build_stage_1_start(paths)
    demo.run_training(demo.stage_config("pretrain", paths), paths["pretrain"])
    phases = {
        "MAT": (),
        **{row: load_config_file(os.path.join(ABLATIONS, f"table4_{row.lower()}.py")).phases for row in ("PT1", "PT2")},
    }
    scores = {row: [] for row in (*ROWS, VISUAL_ONLY)}  # per row, per seed: {"all": {group: acc}, "unseen": ...}
    for seed in args.seeds:
        for row in ROWS:
            workdir = os.path.join(args.out, "ablate", f"{row.lower()}_seed{seed}")
            results = scored_run(workdir, row, phases[row], seed, args.steps, paths)
            scores[row].append(results["normal"])
            if row == "MAT":
                scores[VISUAL_ONLY].append(results["visual_only"])
    steps = args.steps or demo.stage_config("sft", paths).num_steps
    print(
        f"\nTable 4 in miniature: {steps} stage 2 steps a run, seeds {' '.join(map(str, args.seeds))}; "
        f"exact match, mean ± standard deviation over the seeds"
    )
    for split, title in (("all", "held-out split"), ("unseen", "unseen combinations only")):
        print_table(scores, split, title)
    print("\nper seed (held-out split):")
    for row, per_seed in scores.items():
        print(f"  {row}: " + "; ".join(" ".join(f"{g}={s['all'][g]:.2f}" for g in demo.GROUPS) for s in per_seed))
    print(f"ablate wall time {time.time() - start:.0f} s")


def scored_run(workdir, row, phases, seed, steps, paths) -> dict:
    """Trains one run (or finds it trained) and scores it; the scores are kept in workdir/eval.json."""
    scores_path = os.path.join(workdir, "eval.json")
    if os.path.exists(scores_path):
        with open(scores_path) as f:
            return json.load(f)
    config = demo.stage_config("sft", paths, steps)
    config.phases = phases
    config.init_seed = config.data.shuffle_seed = seed
    eval_path = paths["eval"]
    print(f"\n== {row}, seed {seed}: {workdir}", flush=True)
    demo.run_training(config, workdir)
    results = {"normal": summary(demo.evaluate(workdir, eval_path))}
    if row == "MAT":
        results["visual_only"] = summary(demo.evaluate(workdir, eval_path, visual_only=True))
    with open(scores_path, "w") as f:
        json.dump(results, f, indent=1)
    return results


def summary(results: list[dict]) -> dict:
    return {"all": demo.group_accuracy(results), "unseen": demo.group_accuracy(results, "unseen")}


def print_table(scores: dict, split: str, title: str) -> None:
    print(f"\n{title}:\n\n| method | visual | audio | audio-visual | cross-modal timing |\n|---|---|---|---|---|")
    for row, per_seed in scores.items():
        cells = []
        for group in demo.GROUPS:
            values = [s[split][group] for s in per_seed]
            if any(v != v for v in values):  # NaN: no question of the group was asked (audio, visual only)
                cells.append("-")
            else:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
