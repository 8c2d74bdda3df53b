"""`make demo`: train and evaluate a tiny audio-visual LLM on the synthetic demo data, on CPU.

1. writes the demo data set to demo_out/data: training clips with three questions each, and
   held-out clips, drawn from another seed, with one question each;
2. trains a tokenizer on the demo text;
3. trains configs/demo.py into demo_out/run (rerunning resumes, or skips a finished run);
4. answers every held-out question greedily and scores exact match per modality;
5. asks the model one question about a held-out clip through the chat command.

The last line is `demo accuracy: visual=... audio=... audio_visual=...`.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

from avllm_jax.modality import Modality


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="directory for data, tokenizer and run (default demo_out)")
    parser.add_argument("--num-train", type=int, default=3000, help="training clips (three questions each)")
    parser.add_argument("--num-eval", type=int, default=300, help="held-out clips")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.py)")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    start = time.time()

    from avllm_jax.data import conversation, synthetic

    data_dir = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data_dir, "eval.jsonl")):
        synthetic.make_demo_split(data_dir, "train", args.num_train, seed=0, turns_per_sample=3)
        synthetic.make_demo_split(data_dir, "eval", args.num_eval, seed=1)
    tokenizer_dir = os.path.join(args.out, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        conversation.train_tokenizer(synthetic.demo_tokenizer_corpus(), vocab_size=1000).save_pretrained(tokenizer_dir)

    workdir = os.path.join(args.out, "run")
    train_seconds = run_training(args, data_dir, tokenizer_dir, workdir)
    accuracy = evaluate(workdir, os.path.join(data_dir, "eval.jsonl"))
    chat_once(workdir, os.path.join(data_dir, "eval.jsonl"))
    print(f"demo wall time {time.time() - start:.0f} s (training {train_seconds:.0f} s)")
    print("demo accuracy: " + " ".join(f"{m}={accuracy[m]:.2f}" for m in Modality))


def run_training(args, data_dir, tokenizer_dir, workdir) -> float:
    import importlib.util

    from avllm_jax.train import train

    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.tokenizer = tokenizer_dir
    config.data.sources = (dict(path=os.path.join(data_dir, "train.jsonl"), media_root=None, weight=1.0),)
    if args.steps:
        config.num_steps = args.steps
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    train(config, workdir)
    return time.time() - start


def evaluate(workdir: str, eval_path: str, batch_size: int = 50) -> dict[str, float]:
    """Greedy answers to every held-out question; exact match per modality, printed as a table.

    Each held-out conversation is the prompt, its answer cut off: built as training builds it."""
    import tqdm

    import avllm_jax
    from avllm_jax.checkpoint import read_data_config
    from avllm_jax.data import conversation, pipeline
    from avllm_jax.evaluation.metrics import exact_match
    from avllm_jax.inference.prompts import answer_conversations

    model = avllm_jax.load_model(workdir)
    tokenizer = conversation.load_tokenizer(workdir)
    data_config = read_data_config(workdir)
    items = list(pipeline.iterate_eval(eval_path, data_config))
    correct, total = collections.Counter(), collections.Counter()
    examples = {}
    for begin in tqdm.trange(0, len(items), batch_size, desc="evaluating held-out split", unit="batch"):
        chunk = items[begin : begin + batch_size]
        answers = answer_conversations(
            model, tokenizer, [media for _, media in chunk], [sample.turns[:-1] for sample, _ in chunk],
            [sample.modality for sample, _ in chunk], max_new_tokens=8, data_config=data_config,
        )
        for (sample, _), answer in zip(chunk, answers):
            question, reference = sample.turns[-2][1], sample.turns[-1][1]
            total[sample.modality] += 1
            correct[sample.modality] += exact_match(answer, [reference])
            examples.setdefault(sample.modality, (question, reference, answer))
    print("\n| modality | held-out samples | exact match |\n|---|---|---|")
    for modality in Modality:
        print(f"| {modality} | {total[modality]} | {correct[modality] / max(total[modality], 1):.3f} |")
    for modality, (question, reference, answer) in examples.items():
        print(f"  e.g. [{modality}] {question!r} -> {answer!r} (reference {reference!r})")
    return {m.value: correct[m] / max(total[m], 1) for m in Modality}


def chat_once(workdir: str, eval_path: str) -> None:
    """One question about the first held-out audio-visual clip, through `python -m avllm_jax.chat`."""
    import subprocess

    from avllm_jax.data import conversation

    samples, _ = conversation.read_samples(eval_path)
    media = next(s.media_path for s in samples if s.modality == Modality.AUDIO_VISUAL)
    question = "What colour is the shape and is the tone high or low?"
    print(f"\n$ python -m avllm_jax.chat --checkpoint {workdir} --media {media} --question {question!r}", flush=True)
    subprocess.run([sys.executable, "-m", "avllm_jax.chat", "--checkpoint", workdir, "--media", media, "--question", question], check=True)


if __name__ == "__main__":
    main()
