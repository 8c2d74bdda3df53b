"""The paper's Table 9 (tuning parameters), its LoRA row: stage 2 as configs/sft.py, but the
LLM's base weights frozen and low-rank adapters trained on all its attention and MLP
projections, beside the projectors. configs/sft.py is the table's full-tuning row.

    python -m avllm_jax.train --config=configs/pretrain.py --workdir=runs/pretrain   # first
    python -m avllm_jax.train --config=configs/ablations/table9_lora.py --workdir=runs/table9_lora \
        --config.data.sources='[{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]'
    python -m avllm_jax.plan --config=configs/ablations/table9_lora.py --topology=v5p-32   # its memory

The paper gives no LoRA settings; these are LLaVA-1.5's LoRA recipe (rank 128, alpha 256, every
linear layer of the LLM, learning rate 2e-4), with one learning rate for the projectors too.
"""

import os

from avllm_jax.training.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(__file__), "..", "sft.py"))
    config.lora.update(dict(rank=128, alpha=256.0, targets=(r"layers\.(q|k|v|o|gate|up|down)_proj",)))
    config.trainable = (r"(temporal|spatial|audio)_proj\..*", r"llm\.layers\.lora\..*")
    config.optim.learning_rate = 2e-4
    return config
