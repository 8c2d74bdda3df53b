"""Stage 2, instruction tuning: projectors + LLM train (lr 2e-5, batch 128, 1 epoch), from the
pretraining result.

    python -m avllm_jax.train --config=configs/pretrain.py --workdir=runs/pretrain   # first
    python -m avllm_jax.train --config=configs/sft.py --workdir=runs/sft \
        --config.data.sources='[{"path": "data/instructions.jsonl", "media_root": "data/media", "weight": 1.0}]'
"""
from avllm_jax.training.config import accelerator_model_overrides, base_config


def get_config():
    config = base_config()
    config.init_checkpoint = "runs/pretrain"  # stage 1's workdir
    config.model.update(accelerator_model_overrides())
    config.trainable = (r"(temporal|spatial|audio)_proj\..*", r"llm\..*")
    config.global_batch_size = 128
    config.num_epochs = 1.0
    config.optim.learning_rate = 2e-5
    # Media as in the paper, which are the data defaults: 32 frames at 224 px, 4 audio segments
    # for the fused HTSAT of laion/clap-htsat-fused.
    config.data.max_text_length = 512
    return config
