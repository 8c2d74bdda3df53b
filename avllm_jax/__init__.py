"""avllm_jax: Audio-Visual LLM in JAX/Flax NNX.

`avllm_jax.load_model(path)` loads a converted checkpoint or a training workdir
(see avllm_jax/checkpoint.py); it is imported on first use so that the data
modules can be used without loading orbax.
"""

import os

# transformers warns on import that PyTorch is missing ("Models won't be available"): this
# package uses its tokenizers and configs only, so that is noise on every command.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def __getattr__(name):
    if name == "load_model":
        from avllm_jax.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'avllm_jax' has no attribute {name!r}")
