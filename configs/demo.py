"""The CPU demo: a ~1M-parameter model trained from scratch on the synthetic demo data set.

    make demo
    # or by hand:
    python tools/make_demo_data.py --out demo_out/data --num 3000
    python -m avllm_jax.train --config=configs/demo.py --workdir=demo_out/run \
        --config.tokenizer=demo_out/tokenizer \
        --config.data.sources='[{"path": "demo_out/data/train.jsonl", "weight": 1.0}]'

The encoders are random (nothing can be downloaded) and frozen, as the paper freezes its
pretrained ones; the projectors and the LLM train, from scratch.
"""

from avllm_jax.training.config import base_config


def get_config():
    config = base_config()
    config.tokenizer = "demo_out/tokenizer"
    # All three parts (base_config's model.parts), each its dataclass's defaults plus these.
    config.model.update(
        vision=dict(image_size=64, patch_size=16, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4),
        audio=dict(
            spec_size=64,
            patch_size=(8, 8),
            patch_stride=(8, 8),
            window_size=4,
            embed_dim=16,
            depths=(1, 1),
            num_heads=(2, 2),
        ),
        llm=dict(
            hidden_size=128,
            intermediate_size=344,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            max_position_embeddings=256,
        ),
    )
    # As in the paper, the encoders stay frozen (here at their random initialisation: nothing
    # can be downloaded); the projectors and the LLM train. Training the encoders too was
    # slower to learn within the CPU budget.
    config.trainable = (r"(temporal|spatial|audio)_proj\..*", r"llm\..*")
    config.data.sources = (dict(path="demo_out/data/train.jsonl", media_root=None, weight=1.0),)
    config.data.num_frames = 4
    config.data.image_size = 64
    config.data.num_audio_segments = 4
    config.data.audio_max_length_s = 0.4  # a quarter of a 1.5 s clip, padded
    config.data.audio_truncation = "rand_trunc"  # unfused HTSAT
    config.data.max_text_length = 80
    config.data.worker_count = 1
    # One CPU decodes, the rest train: on 2 shared cores XLA's threads stall (3.5 steps/s
    # against about 6).
    config.data.dedicated_worker_cpus = 1
    # Packed: 4 packs of two 160-position rows, each pack with ViT slots for 4 clips (16 frames)
    # and HTSAT slots for 4 (about 58% of the demo's samples have each stream): about 15
    # samples a step (unpacked: 16 samples of 103 positions, 64 frames, 64 HTSAT segments).
    # Short rows: on a CPU XLA's attention computes a row's whole square, and one 320-position
    # row a pack trained at 4.8 steps/s, two of 160 at 6.5 (unpacked 5.8).
    config.global_batch_size = 4
    config.data.packing.update(
        dict(enabled=True, rows=2, row_length=160, frames=16, visual_items=4, audio_clips=4, window=32)
    )
    config.num_steps = 2600  # `make demo` in ten minutes on 2 cores (2800 took 608 s)
    config.optim.learning_rate = 2e-3
    config.optim.weight_decay = 0.01
    config.log_every = 100
    config.checkpoint_every = 1400
    config.keep_checkpoints = 1
    return config
