"""Stage 1, pretraining: only the projectors W_t, W_s, W_a train (lr 2e-3, batch 256, 3 epochs).

    python tools/convert_hf_weights.py --clip openai/clip-vit-large-patch14 \
        --clap laion/clap-htsat-fused --llm lmsys/vicuna-7b-v1.5 --allow-pickle --out checkpoints/avllm-init
    python -m avllm_jax.train --config=configs/pretrain.py --workdir=runs/pretrain \
        --config.data.sources='[{"path": "data/pretrain.jsonl", "media_root": "data/media", "weight": 1.0}]'

(the HF model names stand for local directories holding those checkpoints.)
"""
from avllm_jax.training.config import accelerator_model_overrides, base_config


def get_config():
    config = base_config()
    config.init_checkpoint = "checkpoints/avllm-init"  # converted; it must hold all three model.parts
    config.model.update(accelerator_model_overrides())
    config.trainable = (r"(temporal|spatial|audio)_proj\..*",)
    config.global_batch_size = 256
    config.num_epochs = 3.0
    config.optim.learning_rate = 2e-3
    # Media as in the paper, which are the data defaults: 32 frames at 224 px, 4 audio segments
    # for the fused HTSAT of laion/clap-htsat-fused.
    config.data.max_text_length = 256
    return config
