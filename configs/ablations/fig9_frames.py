"""The paper's Figure 9 (the number of video frames T): both stages as configs/pretrain.py and
configs/sft.py with num_frames = COUNT, one of 4, 8, 16, 32, 64 (32 is the default
run). The argument is "STAGE,COUNT":

    python -m avllm_jax.train --config=configs/ablations/fig9_frames.py:pretrain,8 \
        --workdir=runs/fig9_frames_8/pretrain \
        --config.data.sources='[{"path": "data/pretrain.jsonl", "media_root": "data/media", "weight": 1.0}]'
    python -m avllm_jax.train --config=configs/ablations/fig9_frames.py:sft,8 --workdir=runs/fig9_frames_8/sft \
        --config.data.sources='[{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]'

Pretraining starts from the default converted checkpoint (checkpoints/avllm-init).
"""

import os

from avllm_jax.training.config import ablation_stage

CONFIGS = os.path.join(os.path.dirname(__file__), "..")

VALUES = (4, 8, 16, 32, 64)


def get_config(argument="sft,32"):
    stage, count = argument.split(",")
    count = int(count)
    config = ablation_stage(CONFIGS, stage, f"fig9_frames_{count}")
    config.data.num_frames = count
    # Each pack's frame budget scales with T, so a pack holds as many videos as with 32.
    config.data.packing.frames = max(count, config.data.packing.frames * count // 32)
    return config
