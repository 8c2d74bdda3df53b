"""Chat with a model about a video, an audio file or an image, in the browser (a Gradio app).

    python -m avllm_jax.web --checkpoint DIR [--host 127.0.0.1 --port 7860] [--examples FILE ...]

Upload a file or pick an example; the modality follows the file's streams unless the page
forces audio-visual, visual only or audio only. Changing it asks the conversation's first
question again with the new modality, so the answers can be compared. Answers stream token by
token and the conversation goes on turn after turn; Retry draws the last answer again and
Clear starts over. A file that cannot be used gets a message in the page. The model is loaded
once, when the server starts.
"""

from __future__ import annotations

import argparse
import logging
import os

from avllm_jax import checkpoint, cli
from avllm_jax.data import conversation
from avllm_jax.inference import prompts

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser("python -m avllm_jax.web", __doc__)
    parser.add_argument("--checkpoint", required=True, help="converted checkpoint or training workdir")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--examples", nargs="*", default=[], help="media files offered as examples")
    parser.add_argument("--max-duration-s", type=float, default=600.0, help="longest media accepted, in seconds")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the page's default and upper limit per answer")
    prompts.add_media_arguments(parser, feature_cache=False)  # uploads are new files: nothing cached
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.configure_logging(args)
    # What the user gave is checked before the weights load (minutes for a 7B model).
    model_config = checkpoint.checked_model_config(args.checkpoint)
    for example in args.examples:
        cli.require_file(example, "--examples", "example media file")
    data_config = prompts.data_config_from_args(model_config, args)
    cli.require_extra("web", "gradio")
    from avllm_jax import web_app

    logger.info("loading %s ...", args.checkpoint)
    model = checkpoint.load_model(args.checkpoint)
    tokenizer = conversation.load_tokenizer(args.checkpoint)
    page = web_app.build(web_app.App(model, tokenizer, data_config, args))
    allowed = sorted({os.path.dirname(os.path.abspath(path)) for path in args.examples})
    page.queue().launch(
        server_name=args.host,
        server_port=args.port,
        allowed_paths=allowed,
        theme=web_app.THEME,
        footer_links=[],
        show_error=False,
    )


if __name__ == "__main__":
    main()
