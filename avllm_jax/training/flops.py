"""Analytic FLOPs of one training sample, for TFLOP/s and MFU in the logs.

Conventions (one multiply-add = 2 FLOPs; only matrix products are counted):

- A dense layer with P weights applied to n tokens costs 2·P·n forward. Its backward pass
  costs 2·P·n for the input gradient (needed whenever anything before it trains) and 2·P·n
  for the weight gradient (only when its weights train).
- Causal self-attention over S tokens with width D (all heads) costs 2·2·S²·D / 2 forward
  per layer (scores and weighted sum; half the pairs are masked); backward costs 2x forward.
  Bidirectional attention (encoders) counts all S² pairs.
- The encoders are frozen and run forward only. The LLM always runs its backward pass for
  the input gradients (the projectors below it train), and its weight gradients only in SFT.
- The LM head is counted like any dense layer; embeddings (a gather) are free.

So a sample of S LLM tokens with N LLM matmul weights costs (2 + 2 + 2·trainable)·N·S plus
attention, the usual 6·N·S when the LLM trains.
"""
from __future__ import annotations

from avllm_jax.models.avllm import AVLLMConfig

# Peak dense bf16 FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS_PER_DEVICE = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(device) -> float | None:
    """The peak of a jax device, matched on its device_kind; None when unknown (e.g. CPU)."""
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS_PER_DEVICE.items():
        if kind.startswith(name):
            return flops
    return None


def llm_flops(config, sequence_length: int, *, weights_train: bool) -> float:
    c = config
    per_layer = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    matmul_weights = c.num_layers * per_layer + c.hidden_size * c.vocab_size  # + LM head
    passes = 2 + 2 + (2 if weights_train else 0)  # forward, input gradient, weight gradient
    attention_forward = c.num_layers * 2 * 2 * sequence_length**2 * c.num_heads * c.head_dim / 2
    return passes * matmul_weights * sequence_length + 3 * attention_forward


def vision_flops(config, num_frames: int) -> float:
    c = config
    tokens = c.num_patches + 1
    per_layer = 4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size
    patch_embed = c.patch_size**2 * 3 * c.hidden_size * c.num_patches
    attention = c.num_layers * 2 * 2 * tokens**2 * c.hidden_size
    return num_frames * (2 * (c.num_layers * per_layer * tokens + patch_embed) + attention)


def audio_flops(config, num_segments: int) -> float:
    """HTSAT forward: Swin stages on (spec_size/patch)^2 patches shrinking 4x per stage."""
    c = config
    channels = 4 if c.enable_fusion else 1
    total = 2 * c.embed_dim * c.patch_size[0] * c.patch_size[1] * channels * (c.spec_size // c.patch_stride[0]) ** 2
    for stage, (depth, resolution) in enumerate(zip(c.depths, c.resolutions)):
        width = c.embed_dim * 2**stage
        tokens = resolution[0] * resolution[1]
        per_block = (4 + 2 * c.mlp_ratio) * width**2
        window_attention = 2 * 2 * tokens * c.window_size**2 * width
        total += depth * (2 * per_block * tokens + window_attention)
        if stage + 1 < len(c.depths):  # patch merging: 4W -> 2W on tokens/4
            total += 2 * (4 * width) * (2 * width) * tokens / 4
    return num_segments * total


def sample_flops(config: AVLLMConfig, *, sequence_length: int, num_frames: int, num_audio_segments: int, llm_trains: bool) -> float:
    """FLOPs of one training sample (every sample has all T+N+K slots, so all pay the same)."""
    total = llm_flops(config.llm, sequence_length, weights_train=llm_trains)
    if config.vision:
        total += vision_flops(config.vision, num_frames)
        width = config.vision.hidden_size * config.llm.hidden_size
        total += 3 * 2 * width * (num_frames + config.vision.num_patches)  # W_t, W_s: forward + 2 backward
    if config.audio:
        total += audio_flops(config.audio, num_audio_segments)
        total += 3 * 2 * config.audio.num_features * config.llm.hidden_size * num_audio_segments
    return total
