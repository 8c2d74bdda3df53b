"""Convert Hugging Face checkpoints into one avllm_jax model directory (`--help` says how).

The conversion is avllm_jax/convert.py; this file is its command line.
"""

from avllm_jax.convert import main

if __name__ == "__main__":
    main()
