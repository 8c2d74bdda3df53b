"""The paper's Figure 10 (the number of audio segments K): both stages as configs/pretrain.py and
configs/sft.py with num_audio_segments = COUNT, one of 1, 2, 4, 8, 16 (4 is the default
run). The argument is "STAGE,COUNT":

    python -m avllm_jax.train --config=configs/ablations/fig10_segments.py:pretrain,8 \
        --workdir=runs/fig10_segments_8/pretrain \
        --config.data.sources='[{"path": "data/pretrain.jsonl", "media_root": "data/media", "weight": 1.0}]'
    python -m avllm_jax.train --config=configs/ablations/fig10_segments.py:sft,8 --workdir=runs/fig10_segments_8/sft \
        --config.data.sources='[{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]'

Pretraining starts from the default converted checkpoint (checkpoints/avllm-init).
"""

import os

from avllm_jax.training.config import ablation_stage

CONFIGS = os.path.join(os.path.dirname(__file__), "..")

VALUES = (1, 2, 4, 8, 16)


def get_config(argument="sft,4"):
    stage, count = argument.split(",")
    count = int(count)
    config = ablation_stage(CONFIGS, stage, f"fig10_segments_{count}")
    config.data.num_audio_segments = count
    return config
