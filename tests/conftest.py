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
# Two pytest workers and the training processes the tests start share this cache without a
# lock. JAX's size limit would add one, but a process killed between writing an entry and its
# access-time file (the preemption tests kill processes) leaves that cache refusing every later
# write; unlocked, an entry read while another process still writes it fails to decode, and JAX
# warns and compiles it instead.

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


# `make test-fast`, the edit-test loop, leaves out what is slow by nature: tests that start training or
# server processes, drive the browser, or compile for a TPU slice. One table here rather than marks in each
# module, so the inner loop's content is read in one place. A module name covers all its tests; a
# "module::test" name covers that test alone.
INNER_LOOP_EXCLUDED = {
    "test_train.py": "subprocess",
    "test_elastic.py": "subprocess",
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


# `make test` hands whole modules to its two workers (pytest-xdist, --dist loadfile) in collection
# order, the next module to whichever worker runs out: the longest first, so that no long module
# starts last while the other worker idles. Seconds a module took in the full suite on 2 cores
# (docs/testing.md); alternating modules that start processes with modules that compute in
# process, so the two workers compete less for the two cores.
LONGEST_MODULES_FIRST = (
    "test_elastic.py",  # 230 s
    "test_avllm.py",  # 155 s
    "test_failures.py",  # 165 s
    "test_feature_cache.py",  # 180 s
    "test_train.py",  # 90 s
    "test_sharding.py",  # 75 s
    "test_lmms_eval.py",  # 70 s
    "test_llama.py",  # 60 s
    "test_demo_stages.py",  # 50 s
    "test_phases.py",  # 50 s
    "test_evaluation.py",  # 40 s
    "test_plan.py",  # 40 s
    "test_web.py",  # 40 s
    "test_clip_vision.py",  # 30 s
    "test_lora.py",  # 30 s
)


def pytest_collection_modifyitems(config, items):
    rank = {module: index for index, module in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    for item in items:
        module = item.path.name
        test = item.originalname if hasattr(item, "originalname") else item.name
        mark = INNER_LOOP_EXCLUDED.get(f"{module}::{test}") or INNER_LOOP_EXCLUDED.get(module)
        if mark:
            item.add_marker(getattr(pytest.mark, mark))
