"""Tokens, tokenizer loading and prompt templates for instruction data.

The three modality tokens mark where the encoders' rows go in the prompt:
`<VIS>` takes T+N visual tokens, `<AUD>` K audio tokens, `<AUD_VIS>` all T+N+K.
"""
from __future__ import annotations

import os
import string
from collections.abc import Iterable

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VISUAL_TOKEN = "<VIS>"
AUDIO_TOKEN = "<AUD>"
AUDIO_VISUAL_TOKEN = "<AUD_VIS>"
MODALITY_TOKENS = (VISUAL_TOKEN, AUDIO_TOKEN, AUDIO_VISUAL_TOKEN)
# The modality a token stands for, as (has_visual, has_audio).
MODALITY_OF_TOKEN = {VISUAL_TOKEN: (True, False), AUDIO_TOKEN: (False, True), AUDIO_VISUAL_TOKEN: (True, True)}


def add_modality_tokens(tokenizer: transformers.PreTrainedTokenizerBase) -> list[int]:
    """Adds the modality tokens as special tokens (a no-op for those present); returns their ids."""
    missing = [t for t in MODALITY_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return [tokenizer.convert_tokens_to_ids(t) for t in MODALITY_TOKENS]


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in a converted checkpoint or a training workdir."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(path))
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
