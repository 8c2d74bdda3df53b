"""Test set-up: CPU only, 8 virtual devices for the sharding tests, float32 everywhere."""

import os
import tempfile

# XLA:CPU's concurrency-optimised scheduler lets the 8 devices of one process reach two
# collectives of a step in different orders, and they deadlock: one device waits in one
# all-gather, seven in another, and XLA aborts the process 40 s later (README, "Several
# hosts"). The training subprocesses inherit the flag.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Compiling is most of the suite's time on a CPU: compile at XLA's backend optimisation level
# 0 without LLVM's expensive passes, and keep every compiled program on disk, since tests that
# build a fresh model retrace to programs an earlier test compiled, and most training
# subprocesses run the same demo step. From an empty cache the suite took 12 min instead of 23
# (README, Tests).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"avllm_jax_test_xla_cache_{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


# `make test-fast`, the edit-test loop, leaves out what is slow by nature: tests that start training or
# server processes, drive the browser, or compile for a TPU slice. One table here rather than marks in each
# module, so the inner loop's content is read in one place. A module name covers all its tests; a
# "module::test" name covers that test alone.
INNER_LOOP_EXCLUDED = {
    "test_train.py": "subprocess",
    "test_failures.py": "subprocess",
    "test_checkpointing.py": "subprocess",
    "test_phases.py::test_training_resumed_before_the_boundary_ends_as_the_uninterrupted_run": "subprocess",
    "test_evaluation.py::test_two_processes_give_what_one_gives": "subprocess",
    "test_lora.py": "subprocess",
    "test_plan.py::test_a_tpu_slice_compiles_with_splash_attention": "tpu",
    "test_plan.py::test_the_command_line_ends_with_the_plan_line": "subprocess",
    "test_plan.py::test_each_device_computes_its_own_samples": "subprocess",
    "test_plan.py::test_memory_per_device_falls_when_the_devices_double": "subprocess",
    "test_web.py": "browser",
    "test_serve.py": "subprocess",
    "test_lmms_eval.py": "subprocess",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        test = item.originalname if hasattr(item, "originalname") else item.name
        mark = INNER_LOOP_EXCLUDED.get(f"{module}::{test}") or INNER_LOOP_EXCLUDED.get(module)
        if mark:
            item.add_marker(getattr(pytest.mark, mark))
