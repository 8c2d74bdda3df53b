"""Chat with a model about a video, an audio file or an image, in the terminal.

    python -m avllm_jax.chat --checkpoint DIR --media FILE [--modality audio_visual]
    python -m avllm_jax.chat --checkpoint DIR --media FILE --question "What makes the sound?"

The answer is printed as it is generated. The modality follows the streams the file has
(video and audio: audio_visual) unless --modality picks one the file has. Without --question
the chat goes on turn after turn, keeping the conversation (the media stays in the first
turn), until `exit`, `quit` or the end of input (Ctrl-D). Status lines go to stderr,
answers to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import cast

import jax

from avllm_jax import checkpoint, cli
from avllm_jax.data import conversation, samples
from avllm_jax.data.media import MediaError
from avllm_jax.errors import AvllmError
from avllm_jax.inference import generate as gen
from avllm_jax.inference import prompts
from avllm_jax.modality import Modality
from avllm_jax.models import attention

QUIT_WORDS = ("exit", "quit")
logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser("python -m avllm_jax.chat", __doc__)
    parser.add_argument("--checkpoint", required=True, help="converted checkpoint or training workdir")
    parser.add_argument("--media", required=True, help="video, audio file or image")
    parser.add_argument(
        "--modality", choices=[m.value for m in Modality], default=None, help="default: the streams the file has"
    )
    parser.add_argument("--question", default=None, help="answer this one question and exit")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    prompts.add_media_arguments(parser)
    return parser.parse_args(argv)


class _StreamPrinter:
    """Prints a growing decoded text as it grows, holding back what may still change: trailing
    whitespace (stripped from a final answer) and an unfinished multi-byte character."""

    def __init__(self, out):
        self.out, self.shown = out, ""

    def update(self, text: str, final: bool = False) -> None:
        text = text.strip() if final else text.lstrip().rstrip().rstrip("\ufffd")
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text


@cli.entry_point
def main(argv: list[str] | None = None) -> list[str]:
    """Runs the chat; returns the answers given."""
    args = parse_args(argv)
    cli.configure_logging(args)
    # Everything the user gave is checked before the weights load (minutes for a 7B model).
    model_config = checkpoint.checked_model_config(args.checkpoint)
    cli.require_file(args.media, "--media", "media file")
    data_config = prompts.data_config_from_args(model_config, args)
    try:
        media = None if data_config.feature_cache else samples.load_sample_media(args.media, data_config, None)
        modality = prompts.resolve_modality(media, args.modality, args.media) if media is not None else None
    except (MediaError, ValueError) as error:
        raise AvllmError(str(error)) from None
    if modality is not None:
        _check_parts(model_config, modality, args.checkpoint)
    logger.info("loading %s ...", args.checkpoint)
    model = checkpoint.load_model(args.checkpoint)
    tokenizer = conversation.load_tokenizer(args.checkpoint)
    if media is None:  # read from the feature cache, which is checked against the loaded weights
        try:
            media = samples.load_sample_media(args.media, data_config, prompts.open_feature_cache(model, data_config))
            modality = prompts.resolve_modality(media, args.modality, args.media)
        except (MediaError, ValueError) as error:
            raise AvllmError(str(error)) from None
        _check_parts(model_config, modality, args.checkpoint)
    # The attention module logs its choice, once per name: say it now, before the first answer.
    for part in (model.config.vision, model.config.llm):
        if part is not None:
            attention.resolve_implementation(part.attention_implementation)
    assert modality is not None  # resolved from the decoded file, or from its cached features
    how = "forced by --modality" if args.modality else "from the file's streams"
    logger.info("modality: %s (%s)", modality.value, how)

    rng = jax.random.key(args.seed)
    turns: list[tuple[str, str]] = []
    answers = []

    def reply(question: str) -> str:
        nonlocal rng
        message = conversation.first_user_message(question, modality) if not turns else question
        turns.append((conversation.USER_ROLE, message))
        batch = prompts.conversation_batch(model, tokenizer, [media], [turns], [modality], data_config)
        rng, turn_rng = jax.random.split(rng)
        printer, tokens, start = _StreamPrinter(sys.stdout), [], time.perf_counter()
        for token in gen.stream_tokens(
            model,
            batch,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            rng=turn_rng,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
        ):
            tokens.append(token)
            # cast: transformers annotates decode str | list[str]; one sequence of ids gives a str
            printer.update(cast(str, tokenizer.decode(tokens, skip_special_tokens=True)))
        answer = prompts.decode_answer(tokenizer, tokens)
        printer.update(answer, final=True)
        print(flush=True)
        seconds = time.perf_counter() - start
        logger.info("(%d tokens in %.1f s, compilation included on a first turn)", len(tokens), seconds)
        turns.append((conversation.ASSISTANT_ROLE, answer))
        answers.append(answer)
        return answer

    try:
        if args.question is not None:
            reply(args.question)
            return answers
        logger.info("type a question; 'exit' or Ctrl-D ends the chat")
        while True:
            try:
                question = input(f"{conversation.USER_ROLE}: ").strip()
            except EOFError:
                print()
                break
            if question.lower() in QUIT_WORDS:
                break
            if question:
                print(f"{conversation.ASSISTANT_ROLE}: ", end="", flush=True)
                reply(question)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return answers


def _check_parts(model_config, modality: Modality, checkpoint: str) -> None:
    if (
        (modality.has_visual and model_config.vision is None)
        or (modality.has_audio and model_config.audio is None)
        or model_config.llm is None
    ):
        raise AvllmError(f"{checkpoint} lacks the encoder or the LLM that modality {modality.value!r} needs")


if __name__ == "__main__":
    main()
