"""Training from the feature cache against training from media: build time, size, steps/s.

On N demo clips (written to a temporary directory): `tools/cache_features.py` builds the cache
of configs/demo.py (wall time, start-up and compile included, and bytes), then
`python -m avllm_jax.train` runs the same steps from the media and from the cache; the steps/s
printed are those of the log line at the last step (compile excluded: the log's rate is over
the steps since the previous line).
"""

import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def add_arguments(parser):
    parser.add_argument("--clips", type=int, default=400, help="demo clips (three questions each)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run")


def run(args):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from avllm_jax.data import conversation, synthetic

    with tempfile.TemporaryDirectory() as root:
        root = pathlib.Path(root)
        synthetic.make_demo_split(root / "data", "train", args.clips, seed=0, turns_per_sample=3)
        conversation.train_tokenizer(synthetic.demo_tokenizer_corpus(), vocab_size=1000).save_pretrained(
            root / "tokenizer"
        )
        common = [
            f"--config={REPO / 'configs/demo.py'}",
            f"--config.tokenizer={root / 'tokenizer'}",
            f"--config.data.sources=({{'path': '{root / 'data/train.jsonl'}', 'weight': 1.0}},)",
        ]
        start = time.time()
        subprocess.run(
            [sys.executable, str(REPO / "tools/cache_features.py"), *common, f"--out={root / 'features'}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        seconds = time.time() - start
        size = sum(p.stat().st_size for p in (root / "features").iterdir())
        print(
            f"cache of {args.clips} files: built in {seconds:.1f} s wall ({args.clips / seconds:.1f} files/s, "
            "start-up and "
            f"compile included), {size / 1e6:.2f} MB ({size / args.clips / 1e3:.1f} KB a file)"
        )
        rates = {}
        for source, extra in (("media", []), ("cache", [f"--config.data.feature_cache={root / 'features'}"])):
            log = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "avllm_jax.train",
                    *common,
                    f"--workdir={root / source}",
                    f"--config.num_steps={args.steps}",
                    f"--config.log_every={max(args.steps // 3, 1)}",
                    f"--config.checkpoint_every={args.steps}",
                    *extra,
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            last = [line for line in log.splitlines() if line.startswith(f"step {args.steps}/")][-1]
            rates[source] = float(re.search(r"([\d.]+) steps/s", last).group(1))
            print(f"from {source}: {rates[source]:.2f} steps/s at the last log line ({last.split('|')[1].strip()})")
        print(f"from the cache / from media: {rates['cache'] / rates['media']:.2f}x")
