"""Stage 2, instruction tuning: projectors + LLM train (lr 2e-5, batch about 128 samples, 1 epoch), from the
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
    # Packed (docs/packing.md): 16 packs of four 1024-position rows, about 8 instructions each, so
    # about the paper's 128 samples a step; the run prints the estimate. Each pack's ViT slots
    # take 168 frames (5 videos and some images), 16 items, its HTSAT slots 3 clips. Chosen with
    # `python tools/benchmark.py packing --config configs/sft.py`: on the LLaVA length profile in
    # the paper's mix it fills 92% of the positions and 93% of the frames, 90% of the step's
    # FLOPs useful with splash attention (one 2048 row, 128 frames: 83%).
    config.global_batch_size = 16
    config.data.packing.update(
        dict(enabled=True, rows=4, row_length=1024, frames=168, visual_items=16, audio_clips=3, window=32)
    )
    config.train_epochs = 1.0
    config.optim.learning_rate = 2e-5
    # Media as in the paper, which are the data defaults: 32 frames at 224 px, 4 audio segments
    # for the fused HTSAT of laion/clap-htsat-fused.
    config.data.max_text_length = 512
    return config
