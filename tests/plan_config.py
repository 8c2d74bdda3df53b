"""The tiny model (tiny_models' parts) planned for an SFT step of batch 16, for tests/test_plan.py:

python -m avllm_jax.plan --config=tests/plan_config.py --topology=cpu:8   # with tests/ on PYTHONPATH
"""

import dataclasses

from tiny_models import TINY_HTSAT

from avllm_jax.models import clip_vision, llama
from avllm_jax.training.config import base_config

GLOBAL_BATCH = 16


def get_config(attention="xla"):
    config = base_config()
    config.model.vision.update(
        dataclasses.asdict(clip_vision.PRESETS["tiny"]) | {"attention_implementation": attention}
    )
    config.model.audio.update(dataclasses.asdict(TINY_HTSAT))
    llm = {
        k: v
        for k, v in dataclasses.asdict(llama.PRESETS["tiny"]).items()
        if v is not None and k not in llama.LORA_FIELDS
    }
    config.model.llm.update(llm | {"attention_implementation": attention})
    # 0.63 s of audio is 64 log-mel frames, what the tiny HTSAT's 64 x 64 spectrogram takes.
    config.data.update(
        dict(
            num_frames=2,
            image_size=32,
            num_audio_segments=2,
            max_text_length=32,
            audio_truncation="rand_trunc",
            audio_max_length_s=0.63,
        )
    )
    config.trainable = (r"(temporal|spatial|audio)_proj\..*", r"llm\..*")
    config.global_batch_size = GLOBAL_BATCH
    return config
