"""The Gradio page of `python -m avllm_jax.web` (avllm_jax/web.py): a browser tab's session,
the event handlers around one loaded model, and the page. The command imports it once its flags
and files are checked: gradio is an optional dependency (the `web` extra)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import gradio as gr
import jax

from avllm_jax.data import conversation, samples
from avllm_jax.data.media import Media, MediaError
from avllm_jax.inference import generate as gen
from avllm_jax.inference import prompts
from avllm_jax.modality import Modality

FROM_FILE = "from_file"
MODALITY_CHOICES = [
    ("from the file's streams", FROM_FILE),
    ("audio-visual", Modality.AUDIO_VISUAL.value),
    ("visual only", Modality.VISUAL.value),
    ("audio only", Modality.AUDIO.value),
]
MODALITY_LABELS = {value: label for label, value in MODALITY_CHOICES}
# System fonts: the default theme's web fonts would be fetched from the internet.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


@dataclasses.dataclass
class Session:
    """One browser tab's state: the decoded file, the modality in use and the model's turns."""

    name: str = ""
    media: Media | None = None
    modality: Modality | None = None  # None: no usable file, or a forced modality it lacks
    turns: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    first_question: str = ""  # as typed, without the modality token
    draws: int = 0  # answers drawn since the file was loaded: each gets its own key


def stream_answer(model, tokenizer, batch: dict, **sampling) -> Iterator[str]:
    """The answer's text as it grows, then the final answer (`decode_answer`). Like the chat's
    printer it holds back what may still change: trailing whitespace and an unfinished
    multi-byte character; so each text shown extends the one before."""
    tokens, shown = [], ""
    for token in gen.stream_tokens(model, batch, eos_token_id=tokenizer.eos_token_id, **sampling):
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip().rstrip("\ufffd")
        if text.startswith(shown) and len(text) > len(shown):
            shown = text
            yield shown
    yield prompts.decode_answer(tokenizer, tokens)


def describe(media: Media) -> str:
    if not media.has_visual:
        return f"audio, {media.duration_s:.1f} s"
    if media.duration_s == 0:  # load_media's still
        return "image"
    return f"video, {media.duration_s:.1f} s, " + ("with audio" if media.has_audio else "silent")


class App:
    """The page's event handlers around one loaded model."""

    def __init__(self, model, tokenizer, data_config, args: argparse.Namespace):
        self.model, self.tokenizer, self.data_config, self.args = model, tokenizer, data_config, args

    def _use_modality(self, session: Session, choice: str) -> str:
        """Sets the session's modality from the page's choice; returns the status line."""
        session.modality = None
        assert session.media is not None  # called once a file is loaded
        try:
            modality = prompts.resolve_modality(session.media, None if choice == FROM_FILE else choice, session.name)
        except ValueError as e:
            return f"**Error:** {e}."
        part = prompts.missing_part(self.model, modality)
        if part is not None:
            return f"**Error:** the model has no {part}, which modality {MODALITY_LABELS[modality.value]} needs."
        session.modality = modality
        how = "from the file's streams" if choice == FROM_FILE else "chosen"
        return f"`{session.name}`: {describe(session.media)}. Modality: **{MODALITY_LABELS[modality.value]}** ({how})."

    def load(self, path: str | None, choice: str):
        """A new file (uploaded or an example) starts a new conversation."""
        session = Session()
        if path is None:
            return session, [], "Upload a video, an audio file or an image."
        session.name = os.path.basename(path)
        try:
            session.media = samples.load_limited_media(path, self.data_config, self.args.max_duration_s)
        except MediaError as e:
            # The message starts with the server's temporary path; the user knows the file by its name.
            return session, [], f"**Error:** {str(e).replace(path, session.name)}. Upload another file."
        return session, [], self._use_modality(session, choice)

    def change_modality(self, session: Session, choice: str, history: list, *sampling):
        """Restarts the conversation with the new modality: its first question is asked again."""
        if session.media is None:
            yield session, history, gr.skip()
            return
        status = self._use_modality(session, choice)
        if session.modality is None or not session.first_question:
            session.turns = []
            yield session, history, status
            return
        session.turns = [
            (conversation.USER_ROLE, conversation.first_user_message(session.first_question, session.modality))
        ]
        history = history + [{"role": "user", "content": session.first_question}]
        yield from self._answer(session, history, status + " The first question is asked again.", *sampling)

    def ask(self, question: str, session: Session, history: list, *sampling):
        question = question.strip()
        if not question:
            yield session, history, gr.skip(), gr.skip()
            return
        if session.modality is None:
            yield (
                session,
                history,
                "**Error:** nothing to answer about: upload a file, or pick a modality it has.",
                question,
            )
            return
        if not session.turns:
            session.first_question = question
            question_turn = conversation.first_user_message(question, session.modality)
        else:
            question_turn = question
        session.turns = session.turns + [(conversation.USER_ROLE, question_turn)]
        history = history + [{"role": "user", "content": question}]
        for answered_session, answered_history, status in self._answer(session, history, gr.skip(), *sampling):
            yield answered_session, answered_history, status, ""

    def retry(self, session: Session, history: list, *sampling):
        """Draws the last answer again (the same one when decoding greedily)."""
        if session.modality is None or not session.turns or session.turns[-1][0] != conversation.ASSISTANT_ROLE:
            yield session, history, gr.skip()
            return
        session.turns = session.turns[:-1]
        yield from self._answer(session, history[:-1], gr.skip(), *sampling)

    def _answer(self, session: Session, history: list, status, temperature, top_p, top_k, max_new_tokens, seed):
        """Streams the answer to the session's last question into the chat."""
        assert session.media is not None  # a session with a modality has its file
        batch = prompts.conversation_batch(
            self.model, self.tokenizer, [session.media], [session.turns], [session.modality], self.data_config
        )
        # The keys chat.py draws with: its n-th answer uses the n-th split of key(seed).
        rng = jax.random.key(int(seed or 0))
        for _ in range(session.draws + 1):
            rng, draw_rng = jax.random.split(rng)
        session.draws += 1
        history = history + [{"role": "assistant", "content": ""}]
        answer = ""
        for answer in stream_answer(
            self.model,
            self.tokenizer,
            batch,
            rng=draw_rng,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            max_new_tokens=int(max_new_tokens),
        ):
            history[-1] = {"role": "assistant", "content": answer}
            yield session, history, status
        session.turns = session.turns + [(conversation.ASSISTANT_ROLE, answer)]
        yield session, history, status


def build(app: App) -> gr.Blocks:
    args = app.args
    with gr.Blocks(title="avllm_jax", analytics_enabled=False) as page:
        session = gr.State(Session())
        gr.Markdown(f"## Audio-Visual LLM\n`{args.checkpoint}`")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Video, audio file or image", elem_id="upload")
                if args.examples:
                    gr.Examples([[path] for path in args.examples], inputs=[upload], label="Examples")
                choice = gr.Radio(MODALITY_CHOICES, value=FROM_FILE, label="Modality", elem_id="modality")
                with gr.Accordion("Sampling", open=False, elem_id="sampling"):
                    temperature = gr.Slider(
                        0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)", elem_id="temperature"
                    )
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top_p")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0: all)", elem_id="top_k")
                    max_new_tokens = gr.Slider(
                        1, args.max_new_tokens, value=args.max_new_tokens, step=1, label="Max new tokens"
                    )
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                status = gr.Markdown("Upload a video, an audio file or an image.", elem_id="status")
            with gr.Column(scale=2):
                chat = gr.Chatbot(
                    label="Chat",
                    elem_id="chat",
                    render_markdown=False,
                    latex_delimiters=[],
                    height=420,
                    buttons=["copy", "copy_all"],
                )  # text as generated; no sharing to HF
                question = gr.Textbox(
                    placeholder="Ask about the file and press Enter", show_label=False, elem_id="question"
                )
                with gr.Row():
                    retry = gr.Button("Retry", elem_id="retry")
                    clear = gr.Button("Clear", elem_id="clear")
        sampling = [temperature, top_p, top_k, max_new_tokens, seed]
        # One model: answers are computed one at a time, whichever button or tab asked.
        model_queue: dict[str, Any] = dict(concurrency_limit=1, concurrency_id="model")
        answering = [
            choice.input(
                app.change_modality, [session, choice, chat, *sampling], [session, chat, status], **model_queue
            ),
            question.submit(
                app.ask, [question, session, chat, *sampling], [session, chat, status, question], **model_queue
            ),
            retry.click(app.retry, [session, chat, *sampling], [session, chat, status], **model_queue),
        ]
        # A new file or Clear (the button or the chat's bin) stops the answer being written: it
        # belongs to the old conversation.
        # The ignores: gradio annotates `cancels` as dicts; its docs (and its code) take the events.
        upload.change(app.load, [upload, choice], [session, chat, status], cancels=answering)  # type: ignore[arg-type]
        for cleared in (clear.click, chat.clear):
            cleared(
                lambda s: (dataclasses.replace(s, turns=[], first_question=""), []),
                [session],
                [session, chat],
                cancels=answering,  # type: ignore[arg-type]  # as above
            )
    return page
