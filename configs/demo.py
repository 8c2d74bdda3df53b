"""The CPU demo: the paper's recipe at toy scale, on the synthetic demo data set, in three runs.

    make demo    # tools/demo.py writes the data, runs the three and scores the result; by hand:
    python tools/demo.py --standin-only   # trains demo_out/standin_run, writes demo_out/standin, demo_out/aligned
    python -m avllm_jax.train --config=configs/demo.py:pretrain --workdir=demo_out/pretrain
    python -m avllm_jax.train --config=configs/demo.py:sft --workdir=demo_out/run

- `standin`: the stand-in for Vicuna. A 2-layer, 128-wide LLM (nothing else) learns from
  text alone what Vicuna brings (avllm_jax/data/demo_text.py: first, last, n-th item,
  what follows, two lists side by side, counting, naming). tools/demo.py then writes it with
  random frozen encoders and random projectors as a converted checkpoint (demo_out/standin).
- `pretrain`, the paper's stage 1: from the stand-in, only the projectors train, on captions
  that describe each clip segment by segment (demo_text.caption), from projectors started
  fitted to the embeddings of the caption words each media row stands for (tools/demo.py,
  align_projectors, writes demo_out/aligned).
- `sft`, the paper's stage 2: from stage 1, the LLM trains on the questions (the paper's
  trains the projectors too; docs/demo.md says why the demo's does not).

The encoders are random (nothing can be downloaded) and frozen, as the paper freezes its
pretrained ones.
"""

from avllm_jax.training.config import base_config

STAGES = ("scratch", "standin", "pretrain", "sft")
# The model's parts: each its dataclass's defaults plus these. The stand-in trains LLM alone;
# tools/demo.py writes it with random encoders of VISION and AUDIO.
VISION = dict(image_size=64, patch_size=16, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4)
AUDIO = dict(
    spec_size=64, patch_size=(8, 8), patch_stride=(8, 8), window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2)
)
LLM = dict(
    hidden_size=128,
    intermediate_size=344,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_position_embeddings=256,
)


def get_config(stage: str = "scratch"):
    if stage not in STAGES:
        raise ValueError(f"configs/demo.py's stage is one of {STAGES}, not {stage!r} (--config=configs/demo.py:sft)")
    config = base_config()
    # With init_checkpoint the sizes are the checkpoint's: these keep them (and say them).
    config.model.update(vision=VISION, audio=AUDIO, llm=LLM)
    config.data.max_text_length = 80
    config.data.worker_count = 1
    # One CPU decodes, the rest train: on 2 shared cores XLA's threads stall (3.5 steps/s
    # against about 6).
    config.data.dedicated_worker_cpus = 1
    config.optim.weight_decay = 0.01
    config.log_every = 100
    config.keep_checkpoints = 1
    config.data.num_frames = 4
    config.data.image_size = 64
    config.data.num_audio_segments = 4
    config.data.audio_max_length_s = 0.4  # a quarter of a 1.5 s clip, padded
    config.data.audio_truncation = "rand_trunc"  # unfused HTSAT
    # Packed: 4 packs of two 160-position rows, each pack with ViT slots for 4 clips (16 frames)
    # and HTSAT slots for 4 (about 58% of the demo's samples have each stream): about 15
    # samples a step (unpacked: 16 samples of 103 positions, 64 frames, 64 HTSAT segments).
    # Short rows: on a CPU XLA's attention computes a row's whole square, and one 320-position
    # row a pack trained at 4.8 steps/s, two of 160 at 6.5 (unpacked 5.8).
    config.global_batch_size = 4
    config.data.packing.update(
        dict(enabled=True, rows=2, row_length=160, frames=16, visual_items=4, audio_clips=4, window=32)
    )
    if stage == "standin":
        # Text alone: the encoders' slots are the fewest a pack can have (they stay empty).
        config.tokenizer = "demo_out/tokenizer"
        config.trainable = (r"llm\..*",)
        config.data.sources = (dict(path="demo_out/data/lessons.jsonl", media_root=None, weight=1.0),)
        config.data.packing.update(dict(frames=4, visual_items=1, audio_clips=1))
        config.data.max_text_length = 150  # a lesson and its three questions
        # 16 packs a step (about 66 lessons): at 4 (about 16 lessons) the stand-in never learned
        # to read a list from its start, at 1200 steps or 2200 (first item 0.27, 0.30); at 16 it
        # does (1.00), with the first colour, the first place and the direction (docs/demo.md).
        config.global_batch_size = 16
        config.num_steps = 1200
        config.optim.learning_rate = 2e-3
    elif stage == "pretrain":
        # From the stand-in with its projectors fitted to the captions' words (tools/demo.py,
        # align_projectors): each frame row starts as its colour and place, at a word's scale.
        config.init_checkpoint = "demo_out/aligned"
        config.trainable = (r"(temporal|spatial|audio)_proj\..*",)
        config.data.sources = (dict(path="demo_out/data/train_captions.jsonl", media_root=None, weight=1.0),)
        config.data.max_text_length = 112  # a caption of both streams
        # Gently: through the frozen stand-in the projectors grow the colour and drown the place
        # (its share of a frame row's variance 0.57 -> 0.09 in 800 steps at 2e-4, 0.015 at 2e-3;
        # docs/demo.md).
        config.num_steps = 400
        config.optim.learning_rate = 2e-4
    else:  # sft, or scratch: the demo before the stand-in, its LLM trained from nothing in one stage
        config.trainable = (r"(temporal|spatial|audio)_proj\..*", r"llm\..*")
        config.data.sources = (dict(path="demo_out/data/train.jsonl", media_root=None, weight=1.0),)
        if stage == "sft":
            # The LLM alone, where the paper trains the projectors too: trained here, even at a
            # tenth of the rate, they drown the place again and the direction is lost (0.96 -> 0.72).
            config.trainable = (r"llm\..*",)
            config.init_checkpoint = "demo_out/pretrain"
            # The LLM learns to read the place late: at 1600 steps one run of two did (its visual
            # loss fell from 0.10 to 0.03 after step 1000), at 2400 the other did too.
            config.num_steps = 2400
            config.optim.learning_rate = 1e-3
        else:
            config.tokenizer = "demo_out/tokenizer"
            config.num_steps = 2600
            config.optim.learning_rate = 2e-3
    config.checkpoint_every = config.num_steps
    return config
