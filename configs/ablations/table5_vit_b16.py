"""The paper's Table 5 (scaling the visual encoder), its ViT-B/16 row: both stages as
configs/pretrain.py and configs/sft.py with the vision encoder ViT-B/16 (CLIP's, 224 px, 14 x 14 patches: N = 196).
configs/sft.py is the table's ViT-L/14 row.

    python tools/convert_hf_weights.py --clip openai/clip-vit-base-patch16 --clap laion/clap-htsat-fused \
        --llm lmsys/vicuna-7b-v1.5 --allow-pickle \
        --out checkpoints/avllm-init-table5_vit_b16
    python -m avllm_jax.train --config=configs/ablations/table5_vit_b16.py:pretrain \
        --workdir=runs/table5_vit_b16/pretrain \
        --config.data.sources='[{"path": "data/pretrain.jsonl", "media_root": "data/media", "weight": 1.0}]'
    python -m avllm_jax.train --config=configs/ablations/table5_vit_b16.py:sft --workdir=runs/table5_vit_b16/sft \
        --config.data.sources='[{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]'

The sizes below are the checkpoint's (training refuses a converted checkpoint they do not fit).
"""

import os

from avllm_jax.training.config import ablation_stage

CONFIGS = os.path.join(os.path.dirname(__file__), "..")


def get_config(stage="sft"):
    config = ablation_stage(CONFIGS, stage, "table5_vit_b16", converted="checkpoints/avllm-init-table5_vit_b16")
    config.model.vision.update(
        dict(patch_size=16, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12)
    )
    return config
