"""Export a trained avllm_jax model to Hugging Face (`--help` says how).

The export is avllm_jax/export.py; this file is its command line.
"""

from avllm_jax.export import main

if __name__ == "__main__":
    main()
