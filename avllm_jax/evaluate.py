"""Scores a checkpoint on a benchmark the way the paper's tables do.

    python -m avllm_jax.evaluate --checkpoint DIR --task msrvtt_qa --data test_qa.json \
        --media-root videos/ --out results/msrvtt [--judge-endpoint URL --judge-model NAME]
    python -m avllm_jax.evaluate --checkpoint DIR --task jsonl --data held_out.jsonl --out results/mine

`--task jsonl` reads the project's own instruction format (what training reads, docs/data.md):
each sample's first question, asked with its modality token's modality, against its answer.

Open-ended QA is judged by an OpenAI-compatible chat endpoint (Video-ChatGPT protocol) beside
an offline normalised exact match; the video-chat benchmark needs the judge; captioning gives
CIDEr-D (and SPIDEr where SPICE runs). The judge's API key is read from an environment
variable (OPENAI_API_KEY unless --judge-key-env names another), never from the command line,
and is never logged. Rerunning into the same --out directory fills only what is missing.

Questions are answered in batches of --batch-size, each split over this process's devices
(the model copied onto each). Several processes, started like training's
(`--coordinator_address HOST:PORT --num_processes N --process_id I`, or the AVLLM_*
environment variables; see avllm_jax/runtime.py), split the questions: each answers its
share, and process 0 gathers the answers, judges them and writes every output file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from avllm_jax import checkpoint, cli
from avllm_jax.errors import AvllmError, UsageError
from avllm_jax.evaluation.processes import ProcessGroup
from avllm_jax.evaluation.runner import AnswerFn, Query, run_evaluation
from avllm_jax.evaluation.tasks import TASKS, index_media, load_task, resolve_media
from avllm_jax.inference.prompts import add_media_arguments, media_overrides
from avllm_jax.modality import Modality

logger = logging.getLogger(__name__)

FAILURE_KINDS = ("answer_failed", "judge_failed")
DATA_PROBLEM_KINDS = ("missing_media", "no_question", "no_answer")
FAILURES_SHOWN = 5


def model_answer_fn(checkpoint_dir: str, *, media_settings: dict, max_new_tokens: int) -> AnswerFn:
    """Answers queries with the model in `checkpoint_dir`: decodes the batch's media files (several
    at a time: PyAV and numpy release the GIL), then generates greedily, the batch split over
    this process's devices.

    The model is copied onto each device: decoding then moves nothing between devices. (Laid
    out as in training, FSDP, every token would gather every layer's weights.)

    `media_settings` (`inference.prompts.media_overrides`) left None come from the checkpoint: a
    training workdir's data settings, else the defaults fitted to its encoders (see
    inference.prompts.inference_data_config)."""
    from concurrent.futures import ThreadPoolExecutor

    import jax

    from avllm_jax.data.conversation import load_tokenizer
    from avllm_jax.data.samples import load_sample_media
    from avllm_jax.inference.generate import replicate
    from avllm_jax.inference.prompts import answer_questions, inference_data_config, open_feature_cache

    model = checkpoint.load_model(checkpoint_dir)
    devices = jax.local_devices()
    mesh = None
    if len(devices) > 1:
        mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
        model = replicate(model, mesh)
    tokenizer = load_tokenizer(checkpoint_dir)
    data_config = inference_data_config(model, checkpoint_dir, **media_settings)
    cache = open_feature_cache(model, data_config)  # --feature-cache: the benchmark's clips' cached encoder outputs

    decoders = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="decode")

    def answer(queries: list[Query]) -> list[str]:
        media = list(decoders.map(lambda q: load_sample_media(q.media_path, data_config, cache), queries))
        forced = [q.modality for q in queries]
        return answer_questions(
            model,
            tokenizer,
            media,
            [q.question for q in queries],
            modality=None if None in forced else forced,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            data_config=data_config,
            mesh=mesh,
        )

    return answer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser("python -m avllm_jax.evaluate", __doc__)
    parser.add_argument("--checkpoint", required=True, help="converted checkpoint or training workdir")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument(
        "--data", required=True, help="the benchmark's annotation file, as released; for jsonl, an instruction file"
    )
    parser.add_argument(
        "--media-root",
        default=None,
        help="directory holding the videos / audio files (for jsonl: default the --data file's directory)",
    )
    parser.add_argument("--out", required=True, help="output directory; rerunning into it resumes")
    parser.add_argument(
        "--judge-endpoint",
        default=os.environ.get("OPENAI_BASE_URL"),
        help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 (default: $OPENAI_BASE_URL); "
        "without one, QA tasks report exact match only",
    )
    parser.add_argument(
        "--judge-model",
        default=os.environ.get("JUDGE_MODEL", "gpt-3.5-turbo"),
        help="judge model name, written into the report (default: $JUDGE_MODEL or gpt-3.5-turbo)",
    )
    parser.add_argument(
        "--judge-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the judge's API key (default: OPENAI_API_KEY)",
    )
    parser.add_argument("--judge-concurrency", type=int, default=8, help="parallel judge requests")
    parser.add_argument("--judge-retries", type=int, default=5, help="retries on 429 / 5xx before a verdict fails")
    parser.add_argument("--batch-size", type=int, default=8, help="questions answered per model call")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_media_arguments(parser)
    parser.add_argument(
        "--modality",
        choices=[m.value for m in Modality],
        default=None,
        help="force one modality (default: the task's, else each sample's, else the streams each file has)",
    )
    parser.add_argument(
        "--max-failed-fraction",
        type=float,
        default=None,
        help="exit with an error when more than this share of the samples fail (no answer or no verdict); "
        "all failing always is one. Failures are listed either way",
    )
    cli.add_distributed_flags(parser)
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> str:
    """The media root, once the annotation file reads in the task's layout and some of its
    samples have a question, an answer and a media file: all before anything loads."""
    if TASKS[args.task].kind == "videochat" and not args.judge_endpoint:
        raise UsageError(
            f"task {args.task} is scored only by an LLM judge: pass --judge-endpoint (or set OPENAI_BASE_URL)"
        )
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: it must be at least 1")
    cli.require_file(args.data, "--data", "annotation file")
    media_root = args.media_root
    if media_root is None:
        if args.task != "jsonl":
            raise UsageError(f"--media-root is required for task {args.task} (the directory holding its media)")
        media_root = os.path.dirname(os.path.abspath(args.data))
    cli.require_directory(media_root, "--media-root")
    try:
        samples = load_task(args.task, args.data)
    except (OSError, ValueError) as error:  # JSON, CSV or instruction lines that do not parse
        raise AvllmError(f"--data {args.data} is not in the {args.task} layout: {error}") from None
    annotated = [s for s in samples if all(s.questions) and s.answers]
    if not annotated:
        layout = " ".join((TASKS[args.task].load.__doc__ or "").split())  # None under python -OO
        raise AvllmError(
            f"--data {args.data}: none of its {len(samples)} records has a question and an answer as task "
            f"{args.task} reads them ({layout.split('. ')[0]})"
        )
    media_index = index_media(media_root)
    if not any(resolve_media(s, media_index) for s in annotated):
        raise AvllmError(
            f"--media-root {media_root}: none of the media of the {len(annotated)} annotated samples of {args.data} "
            f"is there (the first looks for {', '.join(annotated[0].media) or 'no file'})"
        )
    return media_root


@cli.entry_point
def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    cli.configure_logging(args)
    media_root = check_inputs(args)
    checkpoint.checked_model_config(args.checkpoint)
    # Not recoverable: the others read what process 0 wrote while JAX's shutdown barrier holds it.
    cli.initialize_distributed(args, recoverable=False)
    group = ProcessGroup.of_this_job(args.distributed_timeout_s)
    judge = None
    if args.judge_endpoint:
        from avllm_jax.curation.client import ChatClient, api_key_from_env

        api_key = api_key_from_env(args.judge_key_env)
        if api_key is None and (group is None or group.is_leader):
            logger.warning("$%s is not set; judge requests go without an API key", args.judge_key_env)
        judge = ChatClient(
            args.judge_endpoint,
            args.judge_model,
            api_key,
            temperature=0.0,
            max_concurrency=args.judge_concurrency,
            max_retries=args.judge_retries,
        )
    try:
        answer_fn = model_answer_fn(
            args.checkpoint, media_settings=media_overrides(args), max_new_tokens=args.max_new_tokens
        )
    except ValueError as error:  # media settings the encoders cannot take
        raise AvllmError(str(error)) from None
    summary = run_evaluation(
        args.task,
        args.data,
        media_root,
        args.out,
        answer_fn,
        judge=judge,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        modality=args.modality,
        group=group,
    )
    if summary is None:
        assert group is not None  # run_evaluation returns None on the processes other than the leader only
        print(f"process {group.index} of {group.count}: answered its share; process 0 writes {args.out}")
        return None
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["counts"].items() if v)
    scores = ", ".join(
        f"{name} {key} {value:.4f}" if isinstance(value, float) else f"{name} {key} {value}"
        for name, metric in summary["metrics"].items()
        for key, value in metric.items()
        if key != "n"
    )
    print(f"{args.task}: {scores}\n{counts}\nreport: {os.path.join(args.out, 'summary.md')}")
    failures, too_many = failure_report(summary, args.max_failed_fraction)
    if failures:
        print(failures, file=sys.stderr)
    if too_many:
        sys.exit(1)
    return summary


def failure_report(summary: dict, max_failed_fraction: float | None) -> tuple[str, bool]:
    """(what failed, with the first few reasons; whether that many failures make the run fail).

    A failure is a sample that had its media and question but no answer or no verdict. All
    samples failing (or none usable) always fails the run; `max_failed_fraction` sets a
    lower bar. Data problems (missing media, annotations without a question or answer) are
    counted in the summary, not here."""
    failed = [p for p in summary["problems"] if p["kind"] in FAILURE_KINDS]
    failed_ids = {p["id"] for p in failed}
    usable = summary["counts"]["questions"] - sum(summary["counts"].get(kind, 0) for kind in DATA_PROBLEM_KINDS)
    if usable <= 0:
        return "error: no sample had both its media and its annotation, so nothing was evaluated", True
    fraction = len(failed_ids) / usable
    too_many = len(failed_ids) == usable or (max_failed_fraction is not None and fraction > max_failed_fraction)
    if not failed:
        return "", False
    first = "\n".join(f"  {p['id']}: {p['kind']}: {p['detail']}" for p in failed[:FAILURES_SHOWN])
    more = f"\n  ... and {len(failed) - FAILURES_SHOWN} more in summary.json" if len(failed) > FAILURES_SHOWN else ""
    verdict = "error" if too_many else "warning"
    return (
        f"{verdict}: {len(failed_ids)} of {usable} samples failed ({fraction:.0%}); the first:\n{first}{more}",
        too_many,
    )


if __name__ == "__main__":
    main()
