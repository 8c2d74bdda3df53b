"""Build a frozen-encoder feature cache (`--help` says how).

The builder is avllm_jax/cache_features.py; this file is its command line.
"""

from avllm_jax.cache_features import main

if __name__ == "__main__":
    main()
