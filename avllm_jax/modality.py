"""What the data side and the model side both need to agree on: the modalities and the label
that the loss ignores, and the loss groups. Nothing else lives here, so that both can import it.

A sample is visual-only, audio-only or audio-visual; its prompt holds the modality's token
where the encoders' rows go (`<VIS>`: T+N visual rows, `<AUD>`: K audio rows, `<AUD_VIS>`:
all T+N+K). A text-only sample has no modality (None) and no token.
"""

from __future__ import annotations

import enum

IGNORE_INDEX = -100  # label of every token that is not part of an assistant answer or its EOS


class Modality(enum.StrEnum):
    """A string enum: `Modality("audio") == "audio"`, so configs, JSON and flags keep plain names."""

    VISUAL = "visual"
    AUDIO = "audio"
    AUDIO_VISUAL = "audio_visual"

    def __repr__(self) -> str:  # error messages show 'audio', as a user writes it
        return repr(self.value)

    @property
    def token(self) -> str:
        return _TOKENS[self]

    @property
    def has_visual(self) -> bool:
        return self is not Modality.AUDIO

    @property
    def has_audio(self) -> bool:
        return self is not Modality.VISUAL

    @classmethod
    def from_flags(cls, has_visual: bool, has_audio: bool) -> Modality | None:
        """The modality of a sample with these streams; None for neither (text only)."""
        for modality in cls:
            if (modality.has_visual, modality.has_audio) == (bool(has_visual), bool(has_audio)):
                return modality
        return None

    @classmethod
    def from_token(cls, token: str) -> Modality:
        for modality in cls:
            if modality.token == token:
                return modality
        raise ValueError(f"{token!r} is not a modality token; expected one of {MODALITY_TOKENS}")


_TOKENS = {Modality.VISUAL: "<VIS>", Modality.AUDIO: "<AUD>", Modality.AUDIO_VISUAL: "<AUD_VIS>"}
MODALITY_TOKENS = tuple(m.token for m in Modality)
# The per-sample groups whose losses are reported apart: each modality, then text-only samples.
LOSS_GROUPS = (*(m.value for m in Modality), "text")
