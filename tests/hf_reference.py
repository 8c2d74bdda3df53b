"""Shared test helpers: random-weight Hugging Face models saved to disk, and the parity check."""

import numpy as np
import torch
from flax import nnx

from avllm_jax.data.conversation import train_tokenizer
from avllm_jax.models import conversion

TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What colour is the square? ASSISTANT: red",
    "USER: How many beeps do you hear? ASSISTANT: three",
    "the circle moves left and the tone is high; the triangle moves up and the sound is low",
]


def save_tiny_tokenizer(directory, vocab_size=300):
    tokenizer = train_tokenizer(TOKENIZER_CORPUS * 4, vocab_size=vocab_size)
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_hf(model_class, config, seed=0):
    torch.manual_seed(seed)
    return model_class(config).eval()


def assert_parity(ours, reference, what, rel_tol=1e-4):
    """max |ours - HF| <= rel_tol * max |HF|; prints the measured figure for the README table."""
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    diff = float(np.abs(ours - reference).max())
    scale = float(np.abs(reference).max())
    print(f"PARITY {what}: max|diff|={diff:.3e} max|HF|={scale:.3e} ratio={diff / scale:.3e}")
    assert diff <= rel_tol * scale, f"{what}: max|diff| {diff:.3e} > {rel_tol} * {scale:.3e}"
    return diff


def convert_saved(directory, model_class, config, rules):
    """Our model with the weights of the HF checkpoint saved in `directory`, read through the
    real conversion path (safetensors files, rules, shape checks)."""
    model = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
    tensors = conversion.iterate_tensors(conversion.checkpoint_files(directory))
    flat = conversion.convert_tensors(tensors, rules, conversion.flat_shapes(nnx.state(model)), source=str(directory))
    conversion.load_into(model, flat)
    return model
