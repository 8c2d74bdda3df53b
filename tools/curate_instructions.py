r"""Turns frame/audio captions into instruction data with an OpenAI-compatible chat LLM (paper §3.3).

    OPENAI_API_KEY=... python tools/curate_instructions.py --contexts contexts.jsonl \
        --task conversation description reasoning --modality visual audio audio_visual \
        --endpoint https://api.openai.com/v1 --model gpt-4o --out instructions.jsonl

Contexts come from tools/extract_contexts.py. Rerunning the same command resumes: samples
already in --out (or rejected into <out>.rejected.jsonl) are not requested again. The summary
counts accepted samples per task x modality over the whole output file, like the paper's Table 10.
"""

from __future__ import annotations

import argparse
import sys

from avllm_jax.curation.client import ChatClient, api_key_from_env
from avllm_jax.curation.instructions import TASKS, TEMPLATE_DIR, curate, read_finished, summary_table
from avllm_jax.modality import Modality


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", required=True, help="JSON lines from tools/extract_contexts.py")
    parser.add_argument("--out", required=True, help="instruction JSON lines (appended to; resumable)")
    parser.add_argument("--task", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument(
        "--modality", nargs="+", choices=[m.value for m in Modality], default=[m.value for m in Modality]
    )
    parser.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    parser.add_argument("--templates", default=str(TEMPLATE_DIR), help="directory of templates and rules")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-retries", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = parser.parse_args(argv)

    client = ChatClient(
        args.endpoint,
        args.model,
        api_key_from_env(args.api_key_env),
        temperature=args.temperature,
        max_concurrency=args.concurrency,
        max_retries=args.max_retries,
        timeout_s=args.timeout,
    )
    counts = curate(args.contexts, args.out, client, args.task, args.modality, args.templates)
    print("\nThis run:")
    for key, value in sorted(counts.items()):
        print(f"  {key}: {value}")
    print(f"\nAccepted samples in {args.out}:")
    print(summary_table(read_finished(args.out)))
    return 1 if counts["request_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
