"""avllm_jax: Audio-Visual LLM in JAX/Flax NNX."""


def load_model(path, **kwargs):
    """The model stored at `path` (a converted checkpoint or a training workdir); see
    `avllm_jax.training.checkpointing.load_model`."""
    from avllm_jax.training.checkpointing import load_model as _load_model

    return _load_model(path, **kwargs)
