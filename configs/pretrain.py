"""Stage 1, pretraining: only the projectors W_t, W_s, W_a train (lr 2e-3, batch about 256 samples, 3 epochs).

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
    # Packed (README, Packing): 48 packs of one 2048-position row, about 5 captions each, so
    # about the paper's 256 samples a step; the run prints the estimate. Each pack's ViT slots
    # take up to 6 videos (192 frames) and 8 items with images, its HTSAT slots 4 clips.
    config.global_batch_size = 48
    config.data.packing.update(
        dict(enabled=True, rows=1, row_length=2048, frames=192, visual_items=8, audio_clips=4, window=32)
    )
    config.train_epochs = 3.0
    config.optim.learning_rate = 2e-3
    # Media as in the paper, which are the data defaults: 32 frames at 224 px, 4 audio segments
    # for the fused HTSAT of laion/clap-htsat-fused.
    config.data.max_text_length = 256
    return config
