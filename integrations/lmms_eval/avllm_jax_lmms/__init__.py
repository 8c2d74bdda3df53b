"""lmms-eval's `avllm_jax` model (see model.py), registered through the entry point
`lmms_eval.models` of this package."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="avllm_jax", simple_class_path="avllm_jax_lmms.model.AVLLMJax")
