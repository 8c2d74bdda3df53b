"""Defaults shared by the files in configs/: every field a training run reads.

A config file starts from `base_config()` and sets what its experiment needs, so the file
plus this function is the whole record of a run. Any field can be overridden on the command
line, e.g. `--config.optim.learning_rate=1e-4 --config.mesh.tensor=2`.
"""
import ml_collections

from avllm_jax.data.pipeline import default_data_config


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # A converted checkpoint (tools/convert_hf_weights.py) or an earlier stage's workdir.
    config.init_checkpoint = ""
    config.init_checkpoint_help = "Make it with tools/convert_hf_weights.py (see README, 'Converting weights')."
    # Without init_checkpoint: a tokenizer directory, and config.model holds whole part configs.
    config.tokenizer = ""
    # Per-part overrides of the model config (fields of CLIPVisionConfig, HTSATConfig, LlamaConfig).
    config.model = ml_collections.ConfigDict(dict(vision={}, audio={}, llm={}))
    # Regexes over dotted parameter names (e.g. 'llm.layers.q_proj'); the rest is frozen.
    config.trainable = (r"(temporal|spatial|audio)_proj\..*",)
    config.data = default_data_config()

    config.global_batch_size = 128
    config.num_microbatches = 1  # gradient accumulation: the batch is split into this many passes
    config.num_epochs = 1.0
    config.num_steps = -1  # > 0 overrides num_epochs
    config.seed = 0

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 2e-5
    config.optim.warmup_fraction = 0.03
    config.optim.beta1 = 0.9
    config.optim.beta2 = 0.98
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.0
    config.optim.max_grad_norm = 1.0

    # Device mesh: sizes of ('data', 'fsdp', 'tensor'); -1 takes the rest of the devices.
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.log_every = 10
    config.checkpoint_every = 500
    config.keep_checkpoints = 3
    # Peak FLOP/s of one device for MFU; None looks it up from the device kind.
    config.peak_flops_per_device = ml_collections.FieldReference(None, field_type=float)
    return config


def accelerator_model_overrides() -> dict:
    """bfloat16 compute, remat and fused attention for the full-size model on GPU/TPU."""
    return dict(
        vision=dict(dtype="bfloat16", attention_implementation="auto"),
        audio=dict(dtype="bfloat16"),
        llm=dict(dtype="bfloat16", remat_policy="dots", attention_implementation="auto"),
    )
