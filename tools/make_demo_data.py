"""Writes the demo data set: `python tools/make_demo_data.py --out DIR --num N --seed S`.

DIR/train.jsonl holds N training clips drawn with seed S, none of them showing a held-out
combination (synthetic.HELD_OUT); DIR/eval.jsonl the held-out clips drawn with seed S + 1
(so no clip is shared), a share of them made of held-out combinations, each clip asked every
question of its modality as a sample of its own, flagged "combination": "seen" or "unseen".
Their media lie in DIR/media/, referenced relative to DIR. See avllm_jax/data/synthetic.py
for what the clips show and what is asked.

DIR/train_captions.jsonl describes each training clip (stage 1's data) and DIR/lessons.jsonl
holds the stand-in's text lessons (avllm_jax/data/demo_text.py); configs/demo.py reads them.
"""

from avllm_jax import cli
from avllm_jax.data import demo_text, synthetic


@cli.entry_point
def main(argv=None):
    parser = cli.Parser("python tools/make_demo_data.py", __doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num", type=int, default=3000, help="training clips (one media file each)")
    parser.add_argument("--num-eval", type=int, default=None, help="held-out clips (default: num / 10, at least 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training split; eval uses seed + 1")
    parser.add_argument("--train-turns", type=int, default=3, help="questions per training clip, one conversation")
    parser.add_argument(
        "--unseen-share", type=float, default=0.5, help="share of held-out clips made of held-out combinations"
    )
    parser.add_argument("--lessons", type=int, default=20000, help="the stand-in's text lessons (default 20000)")
    args = parser.parse_args(argv)
    cli.configure_logging(args)
    if args.num < 1:
        parser.error("--num must be positive")
    num_eval = args.num_eval if args.num_eval is not None else max(50, args.num // 10)
    train = synthetic.make_demo_split(args.out, "train", args.num, args.seed, turns_per_sample=args.train_turns)
    held_out = synthetic.make_demo_split(
        args.out, "eval", num_eval, args.seed + 1, unseen_share=args.unseen_share, every_question=True
    )
    captions = demo_text.make_caption_split(args.out, "train", seed=args.seed)
    lessons = demo_text.make_lessons(f"{args.out}/lessons.jsonl", args.lessons, seed=args.seed)
    print(f"wrote {train} ({args.num} clips), {held_out} ({num_eval} clips), {captions} and {lessons}")


if __name__ == "__main__":
    main()
