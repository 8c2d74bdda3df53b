"""OpenAI chat-completion requests read into what the model answers: a file, turns, sampling.

    parse_request(body, served_model, max_new_tokens) -> ChatRequest   checks every field
    MediaSource(media_root, allow_http).resolve(part, scratch_dir) -> path of the file to decode

Media come as content parts with the names OpenAI clients send (`video_url`, `image_url`,
`input_audio`), one per conversation, in the first user message: training puts the media in
the first turn only. A URL is a `data:` URL or a path under the media root; http(s) only when
the server allows it. Every problem is a RequestError (a ValueError) whose message names the
field and the reason, which the server answers with a 400.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import mimetypes
import os
import pathlib
import urllib.parse
import urllib.request

from avllm_jax.errors import AvllmError
from avllm_jax.modality import Modality

MEDIA_PART_TYPES = ("video_url", "image_url", "input_audio")
AUDIO_FORMATS = ("wav", "mp3", "flac")
# Fields read; OpenAI fields outside this set (logprobs, tools, penalties, ...) are refused by
# name rather than ignored, since ignoring them would answer something other than asked.
KNOWN_FIELDS = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "n",
    "modality",
    "ignore_eos",
    "user",
}
MAX_STOP_STRINGS = 4


class RequestError(AvllmError, ValueError):
    """A request the server cannot answer as asked; the message names the field and why."""


@dataclasses.dataclass
class ChatRequest:
    media_part: dict  # the one media content part, as sent
    media_field: str  # where it is, for messages: "messages[0].content[1]"
    turns: list[tuple[str, str]]  # (role, text), ending with a user turn; no modality token yet
    modality: str | None
    stream: bool
    include_usage: bool
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    stop: tuple[str, ...]
    ignore_eos: bool


def _number(body: dict, name: str, default, low, high, *, integer: bool = False, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise RequestError(f"{name} must be {bound}, got {value!r}")
    return value


def _text_of(content, field: str) -> tuple[str, list[tuple[str, dict]]]:
    """A message's text and its media parts [(field, part)]."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{field} must be a string or a list of content parts")
    texts, media = [], []
    for i, part in enumerate(content):
        where = f"{field}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.text must be a string")
            texts.append(part["text"])
        elif kind in MEDIA_PART_TYPES:
            media.append((where, part))
        else:
            raise RequestError(
                f"{where}: unknown content part type {kind!r}; expected text or one of {MEDIA_PART_TYPES}"
            )
    return "\n".join(texts), media


def parse_request(body, served_model: str, max_new_tokens: int) -> ChatRequest:
    """The request's conversation and settings; RequestError naming the first problem.
    max_new_tokens: the default and the most a request may ask for."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise RequestError(f"unsupported fields {unknown}; this server reads {sorted(KNOWN_FIELDS)}")
    if body.get("model", served_model) != served_model:
        raise RequestError(f"model {body['model']!r} is not served here; this server serves {served_model!r}")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise RequestError("n must be 1")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    turns, media = [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            hint = " (the model's template has its own system prompt)" if role == "system" else ""
            raise RequestError(
                f"messages[{i}].role is {role!r}; messages alternate user and assistant, starting with user{hint}"
            )
        text, parts = _text_of(message.get("content"), f"messages[{i}].content")
        if parts and i > 0:
            raise RequestError(f"{parts[0][0]}: media go in the first user message only, as in training")
        media += parts
        turns.append(("USER" if role == "user" else "ASSISTANT", text))
    if turns[-1][0] != "USER":
        raise RequestError("the last message must be the user's")
    if len(media) != 1:
        raise RequestError(
            f"the first user message needs exactly one media part ({', '.join(MEDIA_PART_TYPES)}), got {len(media)}"
        )
    modality = body.get("modality")
    if modality is not None and modality not in [m.value for m in Modality]:
        raise RequestError(f"unknown modality {modality!r}; expected one of {[m.value for m in Modality]}")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if (
        not isinstance(stop, (list, tuple))
        or len(stop) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise RequestError("stream_options may hold include_usage only")
    limit = _number(body, "max_completion_tokens", None, 1, max_new_tokens, integer=True)
    return ChatRequest(
        media_part=media[0][1],
        media_field=media[0][0],
        turns=turns,
        modality=modality,
        stream=bool(body.get("stream", False)),
        include_usage=bool(stream_options.get("include_usage", True)),
        temperature=float(_number(body, "temperature", 0.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, low_open=True)),
        max_new_tokens=_number(body, "max_tokens", limit or max_new_tokens, 1, max_new_tokens, integer=True),
        seed=_number(body, "seed", 0, 0, 2**63 - 1, integer=True),
        stop=tuple(stop),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )


@dataclasses.dataclass(frozen=True)
class MediaSource:
    """Where media URLs may point: data: URLs always, paths under `media_root` (None: no
    paths), http(s) when `allow_http`."""

    media_root: str | None
    allow_http: bool = False
    max_bytes: int = 512 * 2**20

    def resolve(self, part: dict, field: str, scratch_dir: str) -> str:
        """The path of the file a media part names; inline data is written into scratch_dir."""
        kind = part["type"]
        inner = part.get(kind)
        if not isinstance(inner, dict):
            raise RequestError(f"{field}.{kind} must be an object")
        if kind == "input_audio":
            audio_format = inner.get("format")
            if audio_format not in AUDIO_FORMATS:
                raise RequestError(f"{field}.input_audio.format {audio_format!r} is not one of {AUDIO_FORMATS}")
            return self._write(_base64(inner.get("data"), f"{field}.input_audio.data"), audio_format, scratch_dir)
        url = inner.get("url")
        if not isinstance(url, str) or not url:
            raise RequestError(f"{field}.{kind}.url must be a non-empty string")
        if url.startswith("data:"):
            header, _, data = url.partition(",")
            if not header.endswith(";base64"):
                raise RequestError(f"{field}.{kind}.url: a data: URL must be base64 (data:<type>;base64,...)")
            mime = header[len("data:") : -len(";base64")]
            suffix = (mimetypes.guess_extension(mime) or ".bin").lstrip(".")
            return self._write(_base64(data, f"{field}.{kind}.url"), suffix, scratch_dir)
        scheme = urllib.parse.urlparse(url).scheme
        if scheme in ("http", "https"):
            if not self.allow_http:
                raise RequestError(f"{field}.{kind}.url: fetching http(s) URLs is off on this server (--allow-http)")
            return self._fetch(url, field, scratch_dir)
        if scheme not in ("", "file"):
            raise RequestError(f"{field}.{kind}.url: scheme {scheme!r} is not served; use a data: URL or a path")
        return self._local_path(urllib.parse.unquote(url[len("file://") :]) if scheme == "file" else url, field)

    def _local_path(self, path: str, field: str) -> str:
        if self.media_root is None:
            raise RequestError(f"{field}: this server reads no paths (no --media-root); send a data: URL")
        root = pathlib.Path(self.media_root).resolve()
        resolved = (root / path).resolve()
        if not resolved.is_relative_to(root):
            raise RequestError(f"{field}: {path} is outside the media root")
        if not resolved.is_file():
            raise RequestError(f"{field}: {path} does not exist under the media root")
        return str(resolved)

    def _write(self, data: bytes, suffix: str, scratch_dir: str) -> str:
        if len(data) > self.max_bytes:
            raise RequestError(f"inline media of {len(data)} bytes exceeds the limit of {self.max_bytes}")
        path = os.path.join(scratch_dir, f"media.{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _fetch(self, url: str, field: str, scratch_dir: str) -> str:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:  # http(s) only, checked above
                data = response.read(self.max_bytes + 1)
        except OSError as error:
            raise RequestError(f"{field}: fetching {url} failed: {error}") from None
        suffix = pathlib.PurePosixPath(urllib.parse.urlparse(url).path).suffix.lstrip(".") or "bin"
        return self._write(data, suffix, scratch_dir)


def _base64(data, field: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise RequestError(f"{field} must be a non-empty base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64") from None
