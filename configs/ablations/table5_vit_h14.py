"""The paper's Table 5 (scaling the visual encoder), its ViT-H/14 row: both stages as
configs/pretrain.py and configs/sft.py with the vision encoder ViT-H/14 (OpenCLIP's LAION-2B, 224 px, N = 256).
configs/sft.py is the table's ViT-L/14 row.

    python tools/convert_hf_weights.py --clip laion/CLIP-ViT-H-14-laion2B-s32B-b79K --clap laion/clap-htsat-fused \
        --llm lmsys/vicuna-7b-v1.5 --allow-pickle \
        --out checkpoints/avllm-init-table5_vit_h14
    python -m avllm_jax.train --config=configs/ablations/table5_vit_h14.py:pretrain \
        --workdir=runs/table5_vit_h14/pretrain \
        --config.data.sources='[{"path": "data/pretrain.jsonl", "media_root": "data/media", "weight": 1.0}]'
    python -m avllm_jax.train --config=configs/ablations/table5_vit_h14.py:sft --workdir=runs/table5_vit_h14/sft \
        --config.data.sources='[{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]'

The sizes below are the checkpoint's (training refuses a converted checkpoint they do not fit).
"""

import os

from avllm_jax.training.config import ablation_stage

CONFIGS = os.path.join(os.path.dirname(__file__), "..")


def get_config(stage="sft"):
    config = ablation_stage(CONFIGS, stage, "table5_vit_h14", converted="checkpoints/avllm-init-table5_vit_h14")
    config.model.vision.update(
        dict(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=16, hidden_act="gelu")
    )
    return config
