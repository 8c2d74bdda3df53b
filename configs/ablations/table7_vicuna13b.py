"""The paper's Table 7 (scaling the LLM), its Vicuna-13B row: both stages as configs/pretrain.py and
configs/sft.py with Vicuna-13B v1.5 as the LLM. configs/sft.py is the table's Vicuna-7B row.

    python tools/convert_hf_weights.py --clip openai/clip-vit-large-patch14 --clap laion/clap-htsat-fused \
        --llm lmsys/vicuna-13b-v1.5 --allow-pickle \
        --out checkpoints/avllm-init-table7_vicuna13b
    python -m avllm_jax.train --config=configs/ablations/table7_vicuna13b.py:pretrain \
        --workdir=runs/table7_vicuna13b/pretrain \
        --config.data.sources='[{"path": "data/pretrain.jsonl", "media_root": "data/media", "weight": 1.0}]'
    python -m avllm_jax.train --config=configs/ablations/table7_vicuna13b.py:sft --workdir=runs/table7_vicuna13b/sft \
        --config.data.sources='[{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]'
    python -m avllm_jax.plan --config=configs/ablations/table7_vicuna13b.py:sft --topology=v5p-32   # its memory first

The sizes below are the checkpoint's (training refuses a converted checkpoint they do not fit).
"""

import os

from avllm_jax.training.config import ablation_stage

CONFIGS = os.path.join(os.path.dirname(__file__), "..")


def get_config(stage="sft"):
    config = ablation_stage(CONFIGS, stage, "table7_vicuna13b", converted="checkpoints/avllm-init-table7_vicuna13b")
    config.model.llm.update(
        dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)
    )
    return config
