"""The server under concurrent streaming clients: requests/s, tokens/s and time to first token.

`python tools/benchmark.py serve` starts `python -m avllm_jax.serve` on the demo model (the one
`make demo` trained, --checkpoint, when it is there; else configs/demo.py's model with random
weights) over held-out demo clips, and drives it with the real `openai` client, every request
streamed, its EOS ignored so that each answers --max-tokens tokens:

  one at a time   --requests requests, each sent when the last has ended
  concurrent      the same requests from --clients clients at once
  at the limit    --hold-s seconds with max_batch + max_queue clients each sending request after
                  request (the server full, never over): failed requests, and the server's
                  resident memory sampled every 5 s (first, last, largest)

Compilation is warmed up first and not timed. Each phase prints one row.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.generate import demo_benchmark, random_demo_model


def add_arguments(parser):
    parser.add_argument("--checkpoint", default="demo_out/run", help="the model to serve (default: make demo's)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="requests per timed phase")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--hold-s", type=float, default=120.0, help="length of the run at the limit (0: skip it)")
    parser.add_argument("--port", type=int, default=8791)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _stream(client, model: str, url: str, question: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed request: (seconds to the first text, seconds in all, completion tokens)."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}],
            }
        ],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first, time.perf_counter() - start, tokens


def _row(name: str, clients: int, results, seconds: float) -> str:
    ttft = np.array([r[0] for r in results]) * 1000
    tokens = sum(r[2] for r in results)
    return (
        f"| {name:<15} | {clients:>7} | {len(results):>8} | {len(results) / seconds:>10.2f} | {tokens / seconds:>8.1f} "
        f"| {np.percentile(ttft, 50):>13.0f} | {np.percentile(ttft, 95):>13.0f} |"
    )


def run(args):
    import httpx
    import openai

    with tempfile.TemporaryDirectory(prefix="avllm_serve_bench_") as directory:
        qa_file, media_root = demo_benchmark(directory, max(args.requests, 8))
        with open(qa_file) as f:
            questions = [(f"{r['video_id']}.mp4", r["question"]) for r in json.load(f)]
        media = set(os.listdir(media_root))
        questions = [(next(m for m in media if m.startswith(v.removesuffix(".mp4"))), q) for v, q in questions]
        checkpoint = args.checkpoint
        if not os.path.exists(os.path.join(checkpoint, "config.json")):
            print(f"{checkpoint} is not there (make demo writes it): serving configs/demo.py's model, random weights")
            checkpoint = random_demo_model(directory)
        command = [sys.executable, "-m", "avllm_jax.serve", "--checkpoint", checkpoint, "--port", str(args.port)]
        command += ["--media-root", media_root, "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
        command += ["--max-new-tokens", str(args.max_tokens), "--served-model-name", "demo"]
        log = open(os.path.join(directory, "server.log"), "w")  # open while the server runs
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{args.port}"
        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit(pathlib.Path(log.name).read_text()[-3000:])
                try:
                    if httpx.get(f"{base}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(1)
            clients = [
                openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
                for _ in range(max(args.clients, args.max_batch + args.max_queue))
            ]
            work = [questions[i % len(questions)] for i in range(args.requests)]
            ask = lambda client, item: _stream(client, "demo", item[0], item[1], args.max_tokens)

            # Warm-up: every prompt length these questions make, alone and in a full batch.
            for item in questions[: len(work)]:
                ask(clients[0], item)
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(ask, clients[: args.clients], work[: args.clients]))

            print(f"serve benchmark: {checkpoint}, {args.max_tokens} tokens per answer, max_batch {args.max_batch}")
            print("| phase           | clients | requests | requests/s | tokens/s | TTFT p50 (ms) | TTFT p95 (ms) |")
            print("|-----------------|--------:|---------:|-----------:|---------:|--------------:|--------------:|")
            start = time.perf_counter()
            alone = [ask(clients[0], item) for item in work]
            alone_s = time.perf_counter() - start
            print(_row("one at a time", 1, alone, alone_s), flush=True)

            def client_loop(index: int, items) -> list:
                return [ask(clients[index], item) for item in items]

            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                shares = [work[i :: args.clients] for i in range(args.clients)]
                together = [r for rs in pool.map(client_loop, range(args.clients), shares) for r in rs]
            together_s = time.perf_counter() - start
            print(_row("concurrent", args.clients, together, together_s), flush=True)
            ratio = (sum(r[2] for r in together) / together_s) / (sum(r[2] for r in alone) / alone_s)
            prefills = httpx.get(f"{base}/health").json()["prefills"]
            print(f"concurrent / one at a time, tokens/s: {ratio:.1f}x; prefill calls so far {prefills}")

            if args.hold_s > 0:
                held = args.max_batch + args.max_queue
                failures, done, memory = [], [], [_rss_mb(server.pid)]
                deadline = time.monotonic() + args.hold_s

                def hold(index: int) -> None:
                    k = index
                    while time.monotonic() < deadline:
                        try:
                            done.append(ask(clients[index], questions[k % len(questions)]))
                        except Exception as error:  # a failed request, of any kind, is what this phase counts
                            failures.append(repr(error))
                        k += held

                start = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(held) as pool:
                    running = [pool.submit(hold, i) for i in range(held)]
                    while not all(r.done() for r in running):
                        time.sleep(5)
                        memory.append(_rss_mb(server.pid))
                hold_s = time.perf_counter() - start
                print(_row("at the limit", held, done, hold_s))
                print(
                    f"at the limit: {len(done)} requests answered, {len(failures)} failed"
                    f"{' (' + failures[0] + ')' if failures else ''}; server memory (MB) first {memory[0]:.0f}, "
                    f"last {memory[-1]:.0f}, largest {max(memory):.0f}, over {hold_s:.0f} s"
                )
        finally:
            server.terminate()
            server.wait(60)
            log.close()
