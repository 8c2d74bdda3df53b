"""The paper's Table 4 (training strategy), its PT2 row: plain training, first on each branch
apart with visual and audio samples, then jointly on the visual and audio branches with
audio-visual samples (PT1's phases in the other order). Stage 2 as configs/sft.py otherwise.

    python -m avllm_jax.train --config=configs/pretrain.py --workdir=runs/pretrain   # first
    python -m avllm_jax.train --config=configs/ablations/table4_pt2.py --workdir=runs/table4_pt2 \
        --config.data.sources='[{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]'

The paper gives no split between the phases: each takes half the steps, and the run's length is
MAT's (configs/sft.py's one epoch over all the samples), so the three rows train equally long.
Text-only samples (the paper's data has none) are in both phases, mixed through the run as in MAT.
"""

import os

from avllm_jax.training.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(__file__), "..", "sft.py"))
    config.phases = (
        dict(modalities=("visual", "audio", "text"), share=0.5),
        dict(modalities=("audio_visual", "text"), share=0.5),
    )
    return config
