"""The paper's Table 6 (scaling the audio encoder), its Whisper-Base row: both stages as
configs/pretrain.py and configs/sft.py with Whisper-Base's encoder in place of CLAP's HTSAT.
Each clip's first 30 s are encoded once at 16 kHz and its K = 4 audio tokens pool the encoder's
frames over 4 equal spans of the real audio (README, "Whisper as the audio encoder").

    python tools/convert_hf_weights.py --clip openai/clip-vit-large-patch14 --whisper openai/whisper-base \
        --llm lmsys/vicuna-7b-v1.5 --allow-pickle \
        --out checkpoints/avllm-init-table6_whisper_base
    python -m avllm_jax.train --config=configs/ablations/table6_whisper_base.py:pretrain \
        --workdir=runs/table6_whisper_base/pretrain \
        --config.data.sources='[{"path": "data/pretrain.jsonl", "media_root": "data/media", "weight": 1.0}]'
    python -m avllm_jax.train --config=configs/ablations/table6_whisper_base.py:sft \
        --workdir=runs/table6_whisper_base/sft \
        --config.data.sources='[{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]'
"""

import os

from avllm_jax.training.config import ablation_stage

CONFIGS = os.path.join(os.path.dirname(__file__), "..")


def get_config(stage="sft"):
    config = ablation_stage(
        CONFIGS, stage, "table6_whisper_base", converted="checkpoints/avllm-init-table6_whisper_base"
    )
    config.model.audio_kind = "whisper"  # the part 'audio' is Whisper's encoder
    config.model.audio.update(
        dict(
            d_model=512,
            encoder_layers=6,
            encoder_attention_heads=8,
            encoder_ffn_dim=2048,
            dtype="bfloat16",
            attention_implementation="auto",
        )
    )
    config.data.update(dict(audio_front_end="whisper", audio_sample_rate=16000, whisper_mel_bins=80))
    return config
