"""Greedy generation tokens/s against Hugging Face `generate` on the same weights, and evaluation questions/s.

`python tools/benchmark.py generate` builds a small random LlamaForCausalLM (hidden 256,
4 layers by default), converts it through the checkpoint path, and times end-to-end greedy
generation (prefill + decoding) of --new-tokens tokens after a --prompt-length prompt at each
--batch size, EOS disabled so both produce every token. Compilation (ours) and the first call
(HF) are warm-ups, reported apart. It also says whether both produced the same tokens.

Then it times `python -m avllm_jax.evaluate`'s path (media decoding, prompts, batched
generation, scoring) on --eval-questions held-out demo clips with the demo model: the one
`make demo` trained (--demo-checkpoint) when it is there, else the same architecture
(configs/demo.py) with random weights, whose answers run to the token limit.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from benchmarks._timing import best_seconds

DEMO_MAX_NEW_TOKENS = 8  # as tools/demo.py scores the held-out split


def add_arguments(parser):
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per row (the best is reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="run both on this many CPUs (pinned, as many torch threads; default: all). On a shared "
        "machine, --threads 1 compares the two on one core each run alike",
    )
    parser.add_argument(
        "--eval-questions", type=int, default=200, help="demo questions for the evaluation throughput (0: skip)"
    )
    parser.add_argument("--eval-batch", type=int, nargs="+", default=[1, 50], help="evaluation batch sizes")
    parser.add_argument("--demo-checkpoint", default="demo_out/run", help="the model make demo trained, if there")


def run(args):
    if args.threads:
        # Before JAX starts: XLA sizes its CPU thread pool by the CPUs it may use.
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    import jax
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; CPUs {sorted(os.sched_getaffinity(0))} of {os.cpu_count()}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    generation_table(args)
    if args.eval_questions:
        evaluation_throughput(args)


def generation_table(args):
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from avllm_jax.inference.generate import generate
    from avllm_jax.models import conversion, llama

    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        config = llama.LlamaConfig.from_hf(conversion.read_hf_config(directory))
        model = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0)))
        tensors = conversion.iterate_tensors(conversion.checkpoint_files(directory))
        conversion.load_into(
            model, conversion.convert_tensors(tensors, llama.hf_rules(config), conversion.flat_shapes(nnx.state(model)))
        )

    print(f"model: {config}")
    print(f"prompt {args.prompt_length} tokens, {args.new_tokens} new tokens, greedy, EOS disabled, float32")
    header = (
        f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'speed-up':>8} {'ours compile s':>14} "
        f"{'HF 1st call s':>13} {'same tokens':>11}"
    )
    print(header)
    rng = np.random.RandomState(0)
    for batch in args.batch:
        ids = rng.randint(3, args.vocab, (batch, args.prompt_length)).astype(np.int32)

        def ours():
            return np.asarray(
                generate(model, {"input_ids": ids}, max_new_tokens=args.new_tokens, eos_token_id=None).tokens
            )

        def hf():
            with torch.no_grad():
                out = hf_model.generate(
                    torch.from_numpy(ids).long(),
                    attention_mask=torch.ones(ids.shape, dtype=torch.long),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            return out[:, args.prompt_length :].numpy()

        start = time.perf_counter()
        our_tokens = ours()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        hf_tokens = hf()
        hf_first_s = time.perf_counter() - start
        ours_s, hf_s = best_seconds(ours, args.iters), best_seconds(hf, args.iters)
        generated = batch * args.new_tokens
        same = "yes" if np.array_equal(our_tokens, hf_tokens) else f"{(our_tokens == hf_tokens).mean():.0%}"
        print(
            f"{batch:>5} {generated / ours_s:>11.0f} {generated / hf_s:>9.0f} {hf_s / ours_s:>7.2f}x "
            f"{compile_s:>14.1f} {hf_first_s:>13.1f} {same:>11}",
            flush=True,
        )


def demo_benchmark(directory: str, num_questions: int) -> tuple[str, str]:
    """Held-out demo clips (tools/demo.py's split, seed 1) as an MSRVTT-QA file: (file, media root)."""
    from avllm_jax.data import conversation, synthetic

    data = os.path.join(directory, "data")
    samples, _ = conversation.read_samples(synthetic.make_demo_split(data, "eval", num_questions, seed=1))
    records = [
        {"id": s.id, "video_id": s.id, "question": s.turns[0][1].split("\n", 1)[1], "answer": s.turns[1][1]}
        for s in samples
    ]
    path = os.path.join(directory, "qa.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, os.path.join(data, "media")


def random_demo_model(directory: str) -> str:
    """configs/demo.py's model with random weights, saved as a workdir with the demo's tokenizer and media settings."""
    import importlib.util

    from flax import nnx

    from avllm_jax import checkpoint
    from avllm_jax.data import conversation, synthetic
    from avllm_jax.modality import MODALITY_TOKENS
    from avllm_jax.models import avllm
    from avllm_jax.training import config as config_lib

    spec = importlib.util.spec_from_file_location(
        "demo_config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    tokenizer = conversation.train_tokenizer(synthetic.demo_tokenizer_corpus(), vocab_size=1000)
    conversation.add_modality_tokens(tokenizer)
    overrides = config_lib.model_overrides(config)
    overrides["llm"]["vocab_size"] = len(tokenizer)
    # The parts the config names: model_overrides also has blocks for parts it leaves out.
    model_config = avllm.AVLLMConfig(
        **{part: config_lib.part_config(config, part, overrides[part]) for part in config.model.parts},
        modality_token_ids=tuple(tokenizer.convert_tokens_to_ids(t) for t in MODALITY_TOKENS),
    )
    path = os.path.join(directory, "model")
    model = avllm.AVLLM(model_config, rngs=nnx.Rngs(0))
    checkpoint.save_params(os.path.join(path, checkpoint.PARAMS_DIR), nnx.to_pure_dict(nnx.state(model)))
    checkpoint.write_model_config(path, model_config)
    checkpoint.write_data_config(path, config.data)
    tokenizer.save_pretrained(path)
    return path


def evaluation_throughput(args):
    import jax

    from avllm_jax import evaluate
    from avllm_jax.evaluation.runner import run_evaluation

    with tempfile.TemporaryDirectory() as directory:
        data, media_root = demo_benchmark(directory, args.eval_questions)
        trained = os.path.exists(os.path.join(args.demo_checkpoint, "config.json"))
        checkpoint = args.demo_checkpoint if trained else random_demo_model(directory)
        model_described = (
            f"the trained demo model {checkpoint}"
            if trained
            else f"the demo model with random weights (no {args.demo_checkpoint})"
        )
        print(
            f"\nevaluation: {args.eval_questions} held-out demo questions, "
            f"{model_described}, "
            f"greedy, at most {DEMO_MAX_NEW_TOKENS} new tokens, {len(jax.local_devices())} device(s)"
        )
        print(f"{'batch':>5} {'questions/s':>11} {'answered':>8} {'first run s (compiles)':>22}")
        answer_fn = evaluate.model_answer_fn(checkpoint, media_settings={}, max_new_tokens=DEMO_MAX_NEW_TOKENS)
        for batch in args.eval_batch:
            seconds = []
            for attempt in range(2):  # the first compiles every shape the benchmark needs
                start = time.perf_counter()
                summary = run_evaluation(
                    "msrvtt_qa",
                    data,
                    media_root,
                    os.path.join(directory, f"out_{batch}_{attempt}"),
                    answer_fn,
                    checkpoint=checkpoint,
                    batch_size=batch,
                )
                seconds.append(time.perf_counter() - start)
            print(
                f"{batch:>5} {summary['counts']['questions'] / seconds[1]:>11.1f} {summary['counts']['answered']:>8} "
                f"{seconds[0]:>22.1f}",
                flush=True,
            )
