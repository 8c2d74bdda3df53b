"""Every config in configs/ablations/ (the paper's Tables 4-9 and Figures 8-10): it loads with
each of its arguments, passes check_config, and its model, built from shapes alone as the
planner builds it, is the ablation's (the encoder or LLM the table names) and fits its data
settings (image size, audio front end and truncation, packing budget), as training checks them."""

import dataclasses
import glob
import inspect
import os

import pytest
from flax import nnx

from avllm_jax import plan, train
from avllm_jax.data import packing
from avllm_jax.models import avllm, clip_vision, llama, whisper
from avllm_jax.training import config as config_lib

ABLATIONS = os.path.join(os.path.dirname(__file__), "..", "configs", "ablations")
FILES = sorted(glob.glob(os.path.join(ABLATIONS, "*.py")))
# The part each table swaps in, as the preset of the checkpoint the paper names.
EXPECTED = {
    "table5_vit_b16": ("vision", clip_vision.PRESETS["vit_b16"]),
    "table5_vit_h14": ("vision", clip_vision.PRESETS["vit_h14"]),
    "table6_whisper_tiny": ("audio", whisper.PRESETS["whisper_tiny"]),
    "table6_whisper_base": ("audio", whisper.PRESETS["whisper_base"]),
    "table6_whisper_small": ("audio", whisper.PRESETS["whisper_small"]),
    "table7_vicuna13b": ("llm", llama.PRESETS["vicuna_13b"]),
}
# Fields that say how a part computes, not what it is.
COMPUTE_FIELDS = ("dtype", "param_dtype", "attention_implementation", "remat_policy", "vocab_size")


def _arguments(path):
    """The --config=FILE:ARGUMENT values a file takes: none, a stage, or 'stage,count'."""
    module_globals = {}
    exec(compile(open(path).read(), path, "exec"), {"__file__": path}, module_globals)
    if not inspect.signature(module_globals["get_config"]).parameters:
        return [()]
    if "VALUES" in module_globals:
        return [(f"{stage},{value}",) for stage in config_lib.STAGES for value in module_globals["VALUES"]]
    return [(stage,) for stage in config_lib.STAGES]


CASES = [(os.path.basename(path)[:-3], arguments) for path in FILES for arguments in _arguments(path)]


def test_every_table_and_figure_has_configs():
    names = {name for name, _ in CASES}
    for prefix in (
        "table4_mat",
        "table4_pt1",
        "table4_pt2",
        "table5_",
        "table6_",
        "table7_",
        "table9_lora",
        "fig8_",
        "fig9_",
        "fig10_",
    ):
        assert any(name.startswith(prefix) for name in names), prefix


@pytest.mark.parametrize("name, arguments", CASES, ids=[f"{n}:{','.join(a)}" if a else n for n, a in CASES])
def test_ablation_config_is_consistent(name, arguments):
    config = config_lib.load_config_file(os.path.join(ABLATIONS, f"{name}.py"), *arguments)
    config_lib.check_config(config)
    model_config, _ = plan.planned_model_config(config)
    train.check_data_matches_model(config.data, model_config)  # image size, audio front end and truncation
    rows = packing.ModalityRows.of(model_config, config.data)
    if config.data.packing.enabled:
        assert packing.budget_of(config.data, rows).problem(rows, config.data.num_frames) is None
    nnx.eval_shape(lambda: avllm.AVLLM(model_config, rngs=nnx.Rngs(0)))  # the model builds
    if name in EXPECTED:
        part, preset = EXPECTED[name]
        built = getattr(model_config, part)
        compute = {field: getattr(preset, field) for field in COMPUTE_FIELDS if hasattr(preset, field)}
        assert dataclasses.replace(built, **compute) == preset
    if name.startswith("table6_"):
        assert model_config.audio.kind == "whisper" and config.data.audio_sample_rate == 16000
    if name.startswith(("fig9_", "fig10_")):
        stage, count = arguments[0].split(",")
        field = "num_frames" if name.startswith("fig9_") else "num_audio_segments"
        assert config.data[field] == int(count)
        assert config.init_checkpoint == (
            "checkpoints/avllm-init" if stage == "pretrain" else f"runs/{name}_{count}/pretrain"
        )


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_docstring_names_the_paper_and_the_command(path):
    text = open(path).read()
    docstring = text.split('"""')[1]
    assert "The paper's" in docstring and "python -m avllm_jax." in docstring, path


def test_bad_stage_is_refused():
    with pytest.raises(config_lib.ConfigError, match="one of .*'pretrain', 'sft'.* not 'stage2'"):
        config_lib.load_config_file(os.path.join(ABLATIONS, "table7_vicuna13b.py"), "stage2")
