"""The paper's Figure 8 (audio-visual against visual-only input at evaluation): the default model,
trained by configs/pretrain.py and configs/sft.py, answers each benchmark twice, with both streams
and with the visual stream only. Nothing differs in training, so this is configs/sft.py; the
ablation is the evaluation's --modality:

    python -m avllm_jax.evaluate --checkpoint runs/sft --task msrvtt_qa --data test_qa.json \
        --media-root videos/ --out results/msrvtt_av
    python -m avllm_jax.evaluate --checkpoint runs/sft --task msrvtt_qa --data test_qa.json \
        --media-root videos/ --modality visual --out results/msrvtt_visual
"""

import os

from avllm_jax.training.config import load_config_file

CONFIGS = os.path.join(os.path.dirname(__file__), "..")


def get_config():
    return load_config_file(os.path.join(CONFIGS, "sft.py"))
