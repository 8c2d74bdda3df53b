"""Serve a model to any OpenAI client: chat completions about a video, an audio file or an image.

    python -m avllm_jax.serve --checkpoint DIR [--host 127.0.0.1 --port 8000] [--media-root DIR]
                              [--max-batch 8 --max-queue 32 --max-length 2048]

POST /v1/chat/completions (streamed as server-sent events or not), GET /v1/models, GET /health.
Requests are decoded together by continuous batching (inference/batching.py); media are read
and decoded in worker threads, off the decode loop. A request the server cannot answer as asked
gets a 400 naming the problem; a full server a 429 with Retry-After. docs/serving.md has the
request format and examples.
"""

from __future__ import annotations

import argparse
import logging

from avllm_jax import checkpoint, cli
from avllm_jax.data import conversation
from avllm_jax.errors import UsageError
from avllm_jax.inference import prompts

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser("python -m avllm_jax.serve", __doc__)
    parser.add_argument("--checkpoint", required=True, help="converted checkpoint or training workdir")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--media-root", default=None, help="paths in requests are read under this folder only")
    parser.add_argument("--allow-http", action="store_true", help="let requests name http(s) URLs to fetch")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: DIR's name)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache rows)")
    parser.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond those; more get a 429")
    parser.add_argument("--max-length", type=int, default=2048, help="cache positions per request: prompt + answer")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="the default and largest max_tokens")
    parser.add_argument("--max-duration-s", type=float, default=600.0, help="longest media accepted, in seconds")
    parser.add_argument("--media-workers", type=int, default=2, help="threads reading and decoding media")
    prompts.add_media_arguments(parser, feature_cache=False)  # requests bring new files: nothing cached
    args = parser.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_length", "max_new_tokens", "media_workers"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.media_root is not None:
        cli.require_directory(args.media_root, "--media-root", "media folder")
    return args


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.configure_logging(args)
    # What the user gave is checked before the weights load (minutes for a 7B model).
    model_config = checkpoint.checked_model_config(args.checkpoint)
    if model_config.llm is None:
        raise UsageError(f"--checkpoint {args.checkpoint}: the model has no LLM to answer with")
    data_config = prompts.data_config_from_args(model_config, args)
    cli.require_extra("serve", "fastapi", "uvicorn")
    import uvicorn

    from avllm_jax import serve_app

    log.info("loading %s ...", args.checkpoint)
    model = checkpoint.load_model(args.checkpoint)
    service = serve_app.Service(model, conversation.load_tokenizer(args.checkpoint), data_config, args)
    service.engine.start()
    log.info("serving %s on http://%s:%d", service.name, args.host, args.port)
    uvicorn.run(serve_app.create_app(service), host=args.host, port=args.port, log_level="warning")
    service.engine.stop()


if __name__ == "__main__":
    main()
