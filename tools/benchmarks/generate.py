"""Greedy generation tokens/s: avllm_jax `generate` against Hugging Face `generate`, same weights.

`python tools/benchmark.py generate` builds a small random LlamaForCausalLM (hidden 256,
4 layers by default), converts it through the checkpoint path, and times end-to-end greedy
generation (prefill + decoding) of --new-tokens tokens after a --prompt-length prompt at each
--batch size, EOS disabled so both produce every token. Compilation (ours) and the first call
(HF) are warm-ups, reported apart. It also says whether both produced the same tokens.
"""
from __future__ import annotations

import os
import tempfile
import time

from benchmarks._timing import best_seconds


def add_arguments(parser):
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per row (the best is reported)")


def run(args):
    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from avllm_jax.inference.generate import generate
    from avllm_jax.models import conversion, llama

    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        config = llama.LlamaConfig.from_hf(conversion.read_hf_config(directory))
        model = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0)))
        tensors = conversion.iterate_tensors(conversion.checkpoint_files(directory))
        conversion.load_into(model, conversion.convert_tensors(tensors, llama.hf_rules(config), conversion.flat_shapes(nnx.state(model))))

    print(f"model: {config}")
    print(f"prompt {args.prompt_length} tokens, {args.new_tokens} new tokens, greedy, EOS disabled, float32")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; {os.cpu_count()} CPUs")
    header = f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'speed-up':>8} {'ours compile s':>14} {'HF 1st call s':>13} {'same tokens':>11}"
    print(header)
    rng = np.random.RandomState(0)
    for batch in args.batch:
        ids = rng.randint(3, args.vocab, (batch, args.prompt_length)).astype(np.int32)

        def ours():
            return np.asarray(generate(model, {"input_ids": ids}, max_new_tokens=args.new_tokens, eos_token_id=None).tokens)

        def hf():
            with torch.no_grad():
                out = hf_model.generate(torch.from_numpy(ids).long(), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
            return out[:, args.prompt_length:].numpy()

        start = time.perf_counter()
        our_tokens = ours()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        hf_tokens = hf()
        hf_first_s = time.perf_counter() - start
        ours_s, hf_s = best_seconds(ours, args.iters), best_seconds(hf, args.iters)
        generated = batch * args.new_tokens
        same = "yes" if np.array_equal(our_tokens, hf_tokens) else f"{(our_tokens == hf_tokens).mean():.0%}"
        print(f"{batch:>5} {generated / ours_s:>11.0f} {generated / hf_s:>9.0f} {hf_s / ours_s:>7.2f}x "
              f"{compile_s:>14.1f} {hf_first_s:>13.1f} {same:>11}", flush=True)
