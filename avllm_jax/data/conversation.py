"""Instruction samples: reading them, the Vicuna v1.1 template, tokenisation with labels.

The modality tokens (avllm_jax/modality.py) mark where the encoders' rows go in the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
from collections.abc import Iterable
from typing import Any, NoReturn, cast

import numpy as np
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from avllm_jax.errors import AvllmError
from avllm_jax.modality import IGNORE_INDEX, MODALITY_TOKENS, Modality


def add_modality_tokens(tokenizer: transformers.PreTrainedTokenizerBase) -> list[int]:
    """Adds the modality tokens as special tokens (a no-op for those present); returns their ids."""
    missing = [t for t in MODALITY_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    # cast: transformers annotates the result int | list[int], though one token gives one id
    return [cast(int, tokenizer.convert_tokens_to_ids(t)) for t in MODALITY_TOKENS]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class TokenizerError(AvllmError, OSError):
    """A tokenizer that cannot be read: the message names the path and why."""


def looks_local(name: str) -> bool:
    """Whether a tokenizer name is a path on this machine rather than a Hugging Face model id:
    absolute, ./ or ../ (or ~), or under a directory that exists."""
    parent = os.path.dirname(name)
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~"))
        or name in (".", "..")
        or bool(parent and os.path.isdir(parent))
    )


def pretrained_tokenizer(name: str | os.PathLike, what: str = "tokenizer") -> transformers.PreTrainedTokenizerBase:
    """The tokenizer at `name`: a local directory, or a Hugging Face model id (fetched, or from
    the hub's cache). A name that looks local (`looks_local`) is read locally only: a missing
    directory, or one holding no tokenizer, is a TokenizerError at once, naming it (`what`
    says which setting gave it), instead of minutes of retries against the hub."""
    name = os.path.expanduser(os.fspath(name))
    local = os.path.isdir(name) or looks_local(name)
    if local and not os.path.isdir(name):
        raise TokenizerError(f"{what} {name}: no such directory")
    if local and not any(os.path.exists(os.path.join(name, f)) for f in TOKENIZER_FILES):
        raise TokenizerError(f"{what} {name}: not a tokenizer directory (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return transformers.AutoTokenizer.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as error:  # a damaged file, or an id neither the hub nor its cache has
        raise TokenizerError(f"{what} {name}: {str(error).strip().splitlines()[0]}") from None


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in a converted checkpoint or a training workdir."""
    tokenizer = pretrained_tokenizer(path, "the checkpoint's tokenizer in")
    vocab = tokenizer.get_vocab()
    missing = [t for t in MODALITY_TOKENS if t not in vocab]
    if missing:
        raise ValueError(
            f"tokenizer in {path} lacks the modality tokens {missing}; "
            "convert the checkpoint with tools/convert_hf_weights.py, which adds them"
        )
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> transformers.PreTrainedTokenizerFast:
    """A small LLaMA-style BPE tokenizer (byte fallback, `<s>` prepended) trained on `texts`.

    Used by the demo and the tests, where no pretrained tokenizer can be downloaded.
    The modality tokens are not added here: conversion adds them, as for a real checkpoint.
    """
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        initial_alphabet=list(string.printable.strip()) + ["▁"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


# ---------------------------------------------------------------------------------------------
# Instruction samples: reading, the Vicuna v1.1 template, tokenisation with labels.

# Placeholders other projects write (LLaVA: <image>, Valley: <video>), read as ours.
FOREIGN_TOKENS = {"<image>": Modality.VISUAL.token, "<video>": Modality.VISUAL.token, "<audio>": Modality.AUDIO.token}
MEDIA_KEYS = ("video", "image", "audio")

# Vicuna v1.1: "{system} USER: {question} ASSISTANT: {answer}</s>USER: ..."
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
_ROLES = {"human": USER_ROLE, "user": USER_ROLE, "gpt": ASSISTANT_ROLE, "assistant": ASSISTANT_ROLE}


class MalformedSampleError(AvllmError, ValueError):
    """An instruction sample that cannot be used; the message starts with `file:line`."""


class PromptTooLongError(AvllmError, ValueError):
    """A conversation whose modality token falls past the length its ids are cut to."""


@dataclasses.dataclass
class Sample:
    """One instruction sample. `turns` alternate (USER_ROLE, text), (ASSISTANT_ROLE, text), ...

    The first user turn holds exactly one modality token matching `modality`, unless the
    sample is text-only (`media_path` and `modality` None, no token anywhere).
    """

    id: str
    media_path: str | None
    modality: Modality | None
    turns: list[tuple[str, str]]
    origin: str  # "file:line", for error messages


def parse_sample(record, origin: str, media_root: str | os.PathLike | None = None, *, confined: bool = False) -> Sample:
    """Validates one record in our format, LLaVA's or Valley's; raises MalformedSampleError naming `origin`.

    Media paths are joined to `media_root`; `confined`: a path that leaves it is malformed."""

    def fail(reason: str) -> NoReturn:
        raise MalformedSampleError(f"{origin}: {reason}")

    if not isinstance(record, dict):
        fail(f"expected a JSON object, got {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        fail("'conversations' must be a list of at least two turns")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            fail(f"turn {i} must be an object with a string 'value'")
        role = USER_ROLE if i % 2 == 0 else ASSISTANT_ROLE
        if _ROLES.get(turn.get("from", "")) != role:
            fail(f"turn {i} is from {turn.get('from')!r}; turns must alternate human, gpt, starting with human")
        text = turn["value"]
        for foreign, ours in FOREIGN_TOKENS.items():
            text = text.replace(foreign, ours)
        turns.append((role, text))
    if len(turns) % 2:
        fail("the last turn must be an answer (from 'gpt')")

    found = [t for t in MODALITY_TOKENS for _ in range(turns[0][1].count(t))]
    if any(t in text for _, text in turns[1:] for t in MODALITY_TOKENS):
        fail("a modality token may appear only in the first human turn")
    media_keys = [k for k in MEDIA_KEYS if record.get(k)]
    if len(media_keys) > 1:
        fail(f"give one media path, found {media_keys}")
    modality = record.get("modality")
    if modality is not None and modality not in list(Modality):
        fail(f"unknown modality {modality!r}; expected one of {[m.value for m in Modality]}")
    if not media_keys:
        if found or modality:
            fail("a modality token or 'modality' needs a 'video', 'image' or 'audio' path")
        return Sample(str(record.get("id", origin)), None, None, turns, origin)
    if len(found) != 1:
        fail(f"the first human turn must hold exactly one modality token, found {found or 'none'}")
    token_modality = Modality.from_token(found[0])
    if modality is not None and modality != token_modality:
        fail(f"'modality' is {modality!r} but the prompt holds {found[0]}")
    if record.get("image") and token_modality.has_audio:
        fail(f"an image has no audio, yet the prompt holds {found[0]}")
    media_path = record[media_keys[0]]
    if not isinstance(media_path, str):
        fail(f"{media_keys[0]!r} must be a path (a string), got {type(media_path).__name__}")
    if media_root is not None:
        root = os.path.normpath(os.path.abspath(media_root))
        if confined and os.path.commonpath([root, os.path.normpath(os.path.join(root, media_path))]) != root:
            fail(
                f"media path {media_path!r} lies outside media_root {root} (set the source's media_root to a "
                "directory that holds it)"
            )
        media_path = os.path.join(media_root, media_path)
    return Sample(str(record.get("id", origin)), media_path, token_modality, turns, origin)


def read_samples(path: str | os.PathLike, media_root=None, *, skip_malformed: bool = False):
    """Reads a JSONL file (one sample a line) or a JSON array (LLaVA, Valley).

    Media paths are relative to `media_root`, by default the file's directory. A media_root
    given confines them: a path that leaves it ('../x', an absolute path elsewhere) is
    malformed. (Relative to the file's directory they may go up: curated files sit beside
    their media's directory.) Returns (samples, malformed): malformed lines raise
    MalformedSampleError unless `skip_malformed`, in which case they are left out and their
    errors returned.
    """
    path = os.fspath(path)
    confined = media_root is not None
    media_root = os.path.dirname(os.path.abspath(path)) if media_root is None else os.fspath(media_root)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise MalformedSampleError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(records, list):
            raise MalformedSampleError(f"{path}: expected a JSON array of samples")
        entries: list[tuple[str, Any, str | None]] = [
            (f"{path}[{i}]", record, None) for i, record in enumerate(records)
        ]
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append((f"{path}:{number}", json.loads(line), None))
                except json.JSONDecodeError as e:
                    entries.append((f"{path}:{number}", None, f"not valid JSON ({e.msg})"))
    samples, malformed = [], []
    for origin, record, json_error in entries:
        try:
            if json_error:
                raise MalformedSampleError(f"{origin}: {json_error}")
            samples.append(parse_sample(record, origin, media_root, confined=confined))
        except MalformedSampleError as e:
            if not skip_malformed:
                raise
            malformed.append(e)
    return samples, malformed


def first_user_message(question: str, modality: Modality | str) -> str:
    """The first user turn of a sample about media: the modality token, a newline, the question."""
    return f"{Modality(modality).token}\n{question}"


def with_modality(turns: list[tuple[str, str]], modality: Modality) -> list[tuple[str, str]]:
    """The turns with the first turn's modality token rewritten to `modality`'s (after re-routing)."""
    (role, text), rest = turns[0], turns[1:]
    for token in MODALITY_TOKENS:
        text = text.replace(token, Modality(modality).token)
    return [(role, text), *rest]


def render_prompt(turns: list[tuple[str, str]], eos_token: str = "</s>") -> tuple[str, list[tuple[int, int]]]:
    """The Vicuna v1.1 text of `turns` and the character spans of the answers (each with its EOS).

    When the turns end with a user turn, the text ends with "ASSISTANT:", ready for generation.
    """
    text, answer_spans = SYSTEM_PROMPT + " ", []
    for role, message in turns:
        if role == USER_ROLE:
            text += f"{USER_ROLE}: {message} {ASSISTANT_ROLE}:"
        else:
            start = len(text)
            text += f" {message}{eos_token}"
            answer_spans.append((start, len(text)))
    return text, answer_spans


def tokenize_turns(turns, tokenizer, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int32 (input_ids, labels) of the rendered turns; labels are IGNORE_INDEX outside the answers.

    labels[i] is the label of ids[i], not of ids[i + 1]: the model shifts them
    (`AVLLM.embed_inputs`). The conversation is tokenised in one piece, as a generation prompt
    is; with a tokenizer that splits words at spaces (LLaMA's, ours) a prompt's ids are the
    ids of its conversation with the answer cut off after "ASSISTANT:".
    Truncation cuts the end; a sample whose modality token would be cut raises PromptTooLongError.
    """
    text, spans = render_prompt(turns, tokenizer.eos_token)
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], np.int32)
    labels = np.full_like(ids, IGNORE_INDEX)
    for i, (start, end) in enumerate(encoding["offset_mapping"]):
        if end > start and any(start < span_end and end > span_start for span_start, span_end in spans):
            labels[i] = ids[i]
    return truncate(ids, labels, max_length, tokenizer)


def truncate(ids: np.ndarray, labels: np.ndarray, max_length: int | None, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) cut to `max_length`; PromptTooLongError when that would cut the modality token."""
    if max_length is None or ids.size <= max_length:
        return ids, labels
    position = modality_token_position(ids, tokenizer)
    if position >= max_length:
        raise PromptTooLongError(f"the modality token sits at position {position}, past max_length {max_length}")
    return ids[:max_length], labels[:max_length]


def modality_token_position(ids: np.ndarray, tokenizer) -> int:
    """Index of the first modality token in `ids`, -1 when there is none."""
    positions = np.flatnonzero(np.isin(ids, [tokenizer.convert_tokens_to_ids(t) for t in MODALITY_TOKENS]))
    return int(positions[0]) if positions.size else -1
