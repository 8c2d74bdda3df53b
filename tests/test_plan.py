"""The planner compiles the real train step ahead of time for a named topology (cpu:N here; a
TPU slice when libtpu is installed) and reports memory and FLOPs; and the compiled step is
FSDP: each device computes only its own samples, gathering each layer's weights."""

import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from plan_config import GLOBAL_BATCH
from plan_config import get_config as tiny_plan_config

from avllm_jax import plan
from avllm_jax.models import llama
from avllm_jax.training import flops, topologies

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "plan_config.py")


def llm_rows(config) -> int:
    model_config, _ = plan.planned_model_config(config)
    return flops.llm_sequence_length(model_config, config.data)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """`python -m avllm_jax.plan` on cpu:8: its output and the compiled program."""
    hlo = tmp_path_factory.mktemp("plan") / "step.hlo"
    result = subprocess.run(
        [sys.executable, "-m", "avllm_jax.plan", f"--config={CONFIG_FILE}", "--topology=cpu:8", f"--hlo_dump={hlo}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ
        | {"PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, hlo.read_text()


def test_the_command_line_ends_with_the_plan_line(cli):
    out, _ = cli
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(
        r"plan: cpu:8 fits: ([\d.]+) GiB of host memory \(no HBM\) per device, compiled/analytic FLOPs ([\d.]+)", last
    )
    assert match, last
    # Like with like: the matmuls of the compiled program (loops counted trip-count times, x 8
    # devices) against flops.py. Above 1 by the masked half of causal attention, which XLA computes.
    assert 0.95 <= float(match[2]) <= 1.2, last
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out and "2 sample(s) per device per micro-batch" in out


def test_each_device_computes_its_own_samples(cli):
    """FSDP on the compiled program: every activation of the LLM's MLP (width 172, on all
    L' rows) holds 16 / 8 = 2 samples, none the whole batch; the weights are all-gathered."""
    _, hlo = cli
    rows, width = llm_rows(tiny_plan_config()), llama.PRESETS["tiny"].intermediate_size
    shapes = {tuple(map(int, s.split(","))) for s in re.findall(r"\[([\d,]+)\]", hlo)}
    activations = [s for s in shapes if len(s) >= 3 and s[-2:] == (rows, width)]
    assert activations, f"no [.., {rows}, {width}] activation in the HLO"
    batches = {s[-3] for s in activations}
    assert batches == {GLOBAL_BATCH // 8}, sorted(activations)
    assert "all-gather" in hlo


def test_memory_per_device_falls_when_the_devices_double(cli):
    out, _ = cli
    eight = float(re.search(r"total ([\d.]+) MiB", out)[1])
    four = plan.compile_plan(tiny_plan_config(), plan.topology("cpu:4"))
    assert four.memory["total"] * 1024 > 1.5 * eight, (four.memory, eight)
    assert four.fits and four.samples_per_device == GLOBAL_BATCH / 4


def test_a_packed_budget_is_planned_as_packs():
    """A packed config compiles with its packs' shapes (a [P, R, L] batch, F frames a pack), and
    the compiled matmuls match flops.slot_flops_per_step, every slot counted."""
    config = tiny_plan_config()
    config.global_batch_size = 8
    config.data.packing.update(dict(enabled=True, rows=2, row_length=64, frames=6, visual_items=3, audio_clips=2))
    result = plan.compile_plan(config, plan.topology("cpu:4"))
    assert result.fits and 0.95 <= result.ratio <= 1.2, result.summary()
    shapes = {tuple(map(int, s.split(","))) for s in re.findall(r"\[([\d,]+)\]", result.hlo_text)}
    # Each of the 4 devices embeds its own 2 packs' rows: [2 packs x 2 rows, 64, width].
    assert (2 * 2, 64, llama.PRESETS["tiny"].hidden_size) in shapes


def test_topology_names():
    v5p = plan.topology("v5p-32")
    assert (v5p.chips, v5p.hbm_gib, v5p.libtpu_name, v5p.chips_per_host) == (16, 95.0, "v5:2x2x4", (2, 2, 1))
    assert (plan.topology("v4-8").chips, plan.topology("v5e-16").hbm_gib, plan.topology("v5e-64").libtpu_name) == (
        4,
        16.0,
        "v5e:8x8",
    )
    gpu = plan.topology("a100-40gb-8")
    assert (gpu.platform, gpu.chips, gpu.hbm_gib) == ("cpu", 8, 40.0) and "estimate" in gpu.note
    with pytest.raises(plan.PlanError, match=r"unknown topology 'v5p-7'; valid: .*v5p-32.*cpu:N"):
        plan.topology("v5p-7")


def test_a_missing_libtpu_names_the_requirements_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # makes `import libtpu` fail
    with pytest.raises(plan.PlanError, match=r"v5e-4 is compiled by libtpu.*-c constraints.txt -e '\.\[tpu\]'"):
        plan.topology_devices(plan.topology("v5e-4"))


def test_the_batch_must_split_over_the_micro_batches_and_devices():
    config = tiny_plan_config()
    with pytest.raises(plan.PlanError, match="global_batch_size 16 does not split into 3 micro-batches"):
        plan.compile_plan(config, plan.topology("cpu:8"), num_microbatches=3)


def test_running_out_of_memory_is_reported_as_does_not_fit(monkeypatch):
    """What libtpu raises when the temporaries exceed HBM (here without compiling)."""

    def out_of_memory(lowered, compiler_options=None):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (270.90G) "
            "exceeds available HBM (15.75G)."
        )

    monkeypatch.setattr(jax.stages.Lowered, "compile", out_of_memory)
    result = plan.compile_plan(tiny_plan_config(), plan.topology("a100-40gb-8"))
    assert not result.fits and result.ratio is None
    assert result.memory["temporaries"] == pytest.approx(270.90) and 0 < result.memory["arguments"] < 0.01
    assert result.summary().startswith(
        "plan: a100-40gb-8 does not fit: 270.9 GiB of 40.0 GiB per device, compiled/analytic FLOPs n/a"
    )


def test_search_bisects_to_the_fewest_micro_batches_that_fit(monkeypatch):
    config = tiny_plan_config()
    config.global_batch_size = 64  # 8 per device on 8 devices: 1, 2, 4 or 8 micro-batches

    def fake_compile(config, target, num_microbatches):
        total = 100.0 / num_microbatches  # GiB; an A100-40G fits it from 4 micro-batches on
        return plan.Plan(
            topology=target,
            mesh_shape={},
            num_microbatches=num_microbatches,
            samples_per_device=8 / num_microbatches,
            analytic_flops=1.0,
            memory={"total": total},
            fits=total <= target.hbm_gib,
        )

    monkeypatch.setattr(plan, "compile_plan", fake_compile)
    best, tried = plan.search(config, plan.topology("a100-40gb-8"), report=lambda line: None)
    assert best.num_microbatches == 4 and best.samples_per_device == 2
    assert len(tried) <= 3 and {p.num_microbatches for p in tried} <= {1, 2, 4, 8}


def test_hlo_flops_count_every_iteration_of_a_loop():
    """XLA's cost analysis counts a loop's body once; the planner's count, trip-count times."""

    def scanned(weights, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, weights)[0].sum()

    weights, x = jnp.zeros((5, 64, 64)), jnp.zeros((8, 64))
    compiled = jax.jit(jax.grad(scanned)).lower(weights, x).compile()
    exact = 3 * 5 * 2 * 8 * 64 * 64  # forward, input gradient, weight gradient of 5 matmuls
    counted = flops.hlo_matmul_flops(compiled.as_text())
    assert counted.flops == exact and counted.unknown_trip_counts == 0
    assert compiled.cost_analysis()["flops"] < exact / 2


def test_hlo_flops_of_a_convolution_count_only_real_window_taps():
    """TPUs write a batched matmul as a convolution whose batch dimensions are windows dilated
    so that one tap lands on data: [4 batch, 8 x 16] @ [4, 16 x 32] is 2 * 4 * 8 * 16 * 32."""
    hlo = """HloModule m

ENTRY %main (a: f32[4,8,16], b: f32[4,16,32]) -> f32[4,8,32] {
  %a = f32[4,8,16]{2,1,0} parameter(0)
  %b = f32[4,16,32]{2,1,0} parameter(1)
  ROOT %c = f32[4,8,32]{2,1,0} convolution(%a, %b), window={size=4 stride=3 lhs_dilate=4}, dim_labels=0bf_0io->0bf
}
"""
    assert flops.hlo_matmul_flops(hlo).flops == 2 * 4 * 8 * 16 * 32


@pytest.mark.skipif(not topologies.libtpu_installed(), reason="libtpu is not installed (the tpu extra)")
def test_a_tpu_slice_compiles_with_splash_attention(caplog):
    """v5e-4 from this CPU host: 'auto' attention is splash (Mosaic kernels in the program),
    whose attention the FLOPs count analytically."""
    caplog.set_level(logging.INFO, logger="avllm_jax")
    config = tiny_plan_config(attention="auto")
    result = plan.compile_plan(config, plan.topology("v5e-4"))
    assert "'auto' -> 'pallas' (splash attention) on tpu (TPU v5 lite)" in caplog.text
    assert "tpu_custom_call" in result.hlo_text and result.kernel_calls > 0 and result.kernel_attention_flops > 0
    assert result.fits and 0 < result.memory["total"] < 16
    assert 0.9 <= result.ratio <= 1.2, result.ratio
    assert result.summary().startswith("plan: v5e-4 fits: ")
