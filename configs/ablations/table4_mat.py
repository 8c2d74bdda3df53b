"""The paper's Table 4 (training strategy), its MAT row: modality-augmented training, every
modality (visual, audio, audio-visual samples) mixed in each batch for the whole run. This is
configs/sft.py as it is (no config.phases); the file names the row beside PT1 and PT2.

    python -m avllm_jax.train --config=configs/pretrain.py --workdir=runs/pretrain   # first
    python -m avllm_jax.train --config=configs/ablations/table4_mat.py --workdir=runs/table4_mat \
        --config.data.sources='[{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]'
"""

import os

from avllm_jax.training.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(__file__), "..", "sft.py"))
    config.phases = ()  # one phase of everything
    return config
