"""Whether a run fits, before launching it:

    python -m avllm_jax.plan --config=configs/sft.py --topology=v5p-32 [--search] [--config.FIELD=VALUE ...]

It builds the config's train state from shapes alone (the converted checkpoint's config.json
when `init_checkpoint` has one, else each model part's defaults; no weights are read), lays
it out on the topology's mesh with training's shardings, and compiles the real train step
ahead of time for that topology: a TPU slice with libtpu's compiler on this CPU host
(`pip install -c constraints.txt -e ".[tpu]"`), `cpu:N` on N host devices, and a GPU machine
(`a100-40gb-8`, `h100-80gb-8`, ...) with the CPU compiler as an estimate for that mesh.
Attention resolves for the target ('auto' is splash attention on a TPU), not for this host.

It prints the per-device memory the compiler reports against the chip's HBM, the compiled
FLOPs against training/flops.py's analytic figure, and ends with one line:

    plan: v5p-32 fits: 21.3 GiB of 95.0 GiB per device, compiled/analytic FLOPs 1.12

`--search` compiles for each micro-batch count that splits the batch evenly (a bisection)
and reports the fewest that fit, i.e. the largest per-device batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import time
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avllm_jax import checkpoint, cli
from avllm_jax.data import packing, samples
from avllm_jax.modality import MODALITY_TOKENS
from avllm_jax.models import attention, llama
from avllm_jax.models.avllm import AVLLMConfig
from avllm_jax.training import config as config_lib
from avllm_jax.training import flops, optim, sharding, step
from avllm_jax.training.topologies import PlanError, Topology, topology, topology_devices


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser("python -m avllm_jax.plan", __doc__)
    parser.add_config_flag("training config file (configs/*.py)", config_lib.unknown_field)
    parser.add_argument("--topology", required=True, help="target, e.g. v5p-32, v5e-16, v4-8, cpu:8, a100-40gb-8")
    parser.add_argument(
        "--search", action="store_true", help="find the fewest micro-batches (largest per-device batch) that fit"
    )
    parser.add_argument("--hlo-dump", default=None, help="write the compiled program (HLO text, one device's) here")
    return parser.parse_args(argv)


GIB = 2**30
# The CPU compiler plans memory before LLVM runs, and a plan never runs the program: skipping
# LLVM's optimisations halves the compile and leaves the memory figures the same.
_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def planned_model_config(config) -> tuple[AVLLMConfig, str]:
    """The model a run of `config` builds, from shapes alone, and where they came from.

    With a converted checkpoint (or earlier workdir) at `init_checkpoint`, its config.json
    plus the config's overrides, as training reads it. Without one, each part's defaults set
    for the run's data (image size, fused HTSAT for 'fusion' audio, a Whisper encoder's mel bins)
    plus the overrides, and a vocabulary of LLaMA's 32000 tokens and the 3 modality tokens
    conversion adds. Either way with the run's `config.lora` adapters, as training applies them.
    """
    overrides = {
        part: fields for part, fields in config_lib.model_overrides(config).items() if part in config.model.parts
    }
    if config.init_checkpoint and os.path.exists(os.path.join(config.init_checkpoint, checkpoint.CONFIG_FILE)):
        source = os.path.join(config.init_checkpoint, checkpoint.CONFIG_FILE)
        return optim.apply_lora(
            checkpoint.read_model_config(config.init_checkpoint).replace(**overrides), config.lora
        ), source
    data = config.data
    audio_defaults = {
        "htsat": {"enable_fusion": data.audio_truncation == "fusion"},
        "whisper": {"num_mel_bins": data.whisper_mel_bins},
    }
    defaults = {
        "vision": {"image_size": data.image_size},
        "audio": audio_defaults[config.model.audio_kind],
        "llm": {"vocab_size": llama.LlamaConfig().vocab_size + len(MODALITY_TOKENS)},
    }
    parts = {
        part: config_lib.part_config(config, part, defaults[part] | overrides[part]) for part in config.model.parts
    }
    missing = f"{config.init_checkpoint!r} holds no config.json" if config.init_checkpoint else "no init_checkpoint"
    return optim.apply_lora(
        AVLLMConfig(**parts), config.lora
    ), f"each part's defaults and the config's overrides ({missing})"


def abstract_inputs(config, model_config, mesh, num_microbatches: int):
    """(train_step, state, frozen, batch): the compiled function and its arguments as
    ShapeDtypeStructs with training's shardings."""

    def placed(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    model = nnx.merge(*checkpoint.abstract_model(model_config))
    trainable_filter = optim.trainable_filter(list(config.trainable))
    # The ignore: flax types a split into three as a variadic tuple.
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)  # type: ignore[misc]
    optimizer = optim.make_optimizer(config.optim, max(config.num_steps, 1), trainable)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = step.TrainState(
        cast(jax.Array, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)),  # abstract, to compile
        placed(trainable, sharding.state_shardings(trainable, mesh)),
        placed(opt_state, sharding.optimizer_shardings(optimizer, trainable, mesh)),
    )
    element = samples.example_batch_element(config.data, packing.ModalityRows.of(model_config, config.data))
    batch = {
        k: jax.ShapeDtypeStruct(
            (config.global_batch_size, *np.shape(v)), np.asarray(v).dtype, sharding=sharding.batch_sharding(mesh)
        )
        for k, v in element.items()
    }
    train_step = step.make_train_step(graphdef, optimizer, num_microbatches=num_microbatches)
    return train_step, state, placed(frozen, sharding.state_shardings(frozen, mesh)), batch


@dataclasses.dataclass(kw_only=True)
class Plan:
    """What one compile for a target reports; the fields after `analytic_flops` are filled as
    the compile gets that far."""

    topology: Topology
    mesh_shape: dict
    num_microbatches: int
    samples_per_device: float  # per micro-batch
    analytic_flops: float  # per step, all devices: training/flops.py
    memory: dict[str, float] = dataclasses.field(default_factory=dict)  # GiB per device, by kind and total
    fits: bool = False
    compiled_flops: float | None = None  # per step, all devices (None when the compile ran out of memory)
    xla_flops: float | None = None  # XLA's cost analysis, all devices: each loop body counted once
    kernel_attention_flops: float = 0.0  # analytic attention of the parts whose attention is a kernel
    compile_seconds: float = 0.0
    kernel_calls: int = 0  # attention kernels (custom calls) in the program
    hlo_text: str = dataclasses.field(default="", repr=False)

    @property
    def ratio(self) -> float | None:
        return None if self.compiled_flops is None else self.compiled_flops / self.analytic_flops

    def summary(self) -> str:
        fits = "fits" if self.fits else "does not fit"
        hbm = f"{self.topology.hbm_gib:.1f} GiB" if self.topology.hbm_gib else "host memory (no HBM)"
        ratio = "n/a (did not compile)" if self.ratio is None else f"{self.ratio:.2f}"
        memory = f"{self.memory['total']:.1f} GiB of {hbm} per device"
        return f"plan: {self.topology.name} {fits}: {memory}, compiled/analytic FLOPs {ratio}"


def compile_plan(config, target: Topology, num_microbatches: int | None = None) -> Plan:
    """Compiles the train step of `config` for `target` and reads its memory and FLOPs."""
    num_microbatches = num_microbatches or config.num_microbatches
    model_config, _ = planned_model_config(config)
    mesh = sharding.make_mesh(dict(config.mesh), devices=topology_devices(target))
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = config.global_batch_size
    if global_batch % num_microbatches or global_batch % batch_shards:
        raise PlanError(
            f"global_batch_size {global_batch} does not split into {num_microbatches} micro-batches "
            f"and over {batch_shards} batch shards (mesh {dict(mesh.shape)})"
        )
    inputs = abstract_inputs(config, model_config, mesh, num_microbatches)
    started = time.perf_counter()
    # An abstract mesh, not jax.set_mesh: a topology's devices cannot run the constants that
    # tracing makes eagerly (splash attention's mask tables).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = inputs[0].lower(*inputs[1:])
        kernel_parts = tuple(
            part
            for part in ("vision", "llm")
            if getattr(model_config, part)
            and attention.resolve_implementation(getattr(model_config, part).attention_implementation) != "xla"
        )
    analytic = flops.slot_flops_per_step(model_config, config)
    plan = Plan(
        topology=target,
        mesh_shape=dict(mesh.shape),
        num_microbatches=num_microbatches,
        samples_per_device=global_batch / num_microbatches / batch_shards,
        analytic_flops=analytic,
    )
    try:
        compiled = lowered.compile(compiler_options=_CPU_COMPILER_OPTIONS if target.platform == "cpu" else None)
    except jax.errors.JaxRuntimeError as error:
        # libtpu: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for
        # HLO temporaries (270.90G) exceeds available HBM (15.75G)."
        needed = re.search(r"RESOURCE_EXHAUSTED.*temporaries \(([\d.]+)([KMGT])\)", str(error))
        if not needed:
            raise
        arguments = (
            sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(inputs[1:]))
            / GIB
        )
        temporaries = float(needed[1]) * {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}[needed[2]]
        plan.memory = {"arguments": arguments, "temporaries": temporaries, "total": arguments + temporaries}
        plan.compile_seconds = time.perf_counter() - started
        return plan
    plan.compile_seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    sizes = {
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
    }
    sizes["total"] = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
    plan.memory = {k: v / GIB for k, v in sizes.items()}
    plan.fits = target.hbm_gib is None or plan.memory["total"] <= target.hbm_gib
    plan.hlo_text = compiled.as_text()
    devices = math.prod(mesh.shape.values())
    counted = flops.hlo_matmul_flops(plan.hlo_text)
    plan.kernel_calls = sum(counted.custom_calls.values())
    if plan.kernel_calls:  # the kernels' work is not in the HLO: count their attention analytically
        plan.kernel_attention_flops = flops.step_attention_flops(model_config, config, kernel_parts)
    plan.compiled_flops = counted.flops * devices + plan.kernel_attention_flops
    cost = compiled.cost_analysis()
    plan.xla_flops = cost.get("flops", 0.0) * devices if cost else None
    return plan


def search(config, target: Topology, report=print) -> tuple[Plan | None, list[Plan]]:
    """The plan with the fewest micro-batches that fits (None if even the most do not), and
    every plan compiled on the way. Candidates split the batch evenly over the batch shards;
    memory falls as micro-batches shrink, so a bisection finds it."""
    shards = math.prod(
        sharding.make_mesh(dict(config.mesh), devices=topology_devices(target)).shape[a] for a in ("data", "fsdp")
    )
    per_shard = config.global_batch_size // shards
    candidates = [count for count in range(1, per_shard + 1) if per_shard % count == 0]
    if not candidates or config.global_batch_size % shards:
        raise PlanError(f"global_batch_size {config.global_batch_size} does not split over {shards} batch shards")
    tried: list[Plan] = []
    low, high, best = 0, len(candidates) - 1, None
    while low <= high:
        middle = (low + high) // 2
        plan = compile_plan(config, target, candidates[middle])
        tried.append(plan)
        report(
            f"  {plan.num_microbatches} micro-batches of {plan.samples_per_device:g} per device: "
            f"{plan.memory['total']:.1f} GiB, {'fits' if plan.fits else 'does not fit'} ({plan.compile_seconds:.0f} s)"
        )
        if plan.fits:
            best, high = plan, middle - 1
        else:
            low = middle + 1
    return best, tried


def describe(plan: Plan, config, model_source: str) -> str:
    t, m = plan.topology, plan.memory
    hosts = math.prod(t.chips_per_host)
    where = "libtpu's compiler on this CPU host" if t.platform == "tpu" else "the CPU compiler"
    lines = [
        f"topology {t.name}: {t.chips} {'chips' if t.platform == 'tpu' else 'devices'}"
        + (f" in {t.chips // hosts} host(s) of {hosts}" if t.platform == "tpu" else "")
        + (f", {t.hbm_gib:.1f} GiB HBM each" if t.hbm_gib else "")
        + f"; compiled with {where}"
        + (f" ({t.note})" if t.note else ""),
        f"model: {model_source}",
        f"mesh {plan.mesh_shape}; global batch {config.global_batch_size} in {plan.num_microbatches} micro-batch(es): "
        f"{plan.samples_per_device:g} sample(s) per device per micro-batch",
    ]
    if plan.compiled_flops is None:
        lines.append(
            f"the compiler ran out of memory: temporaries {_size(m['temporaries'])} and arguments "
            f"{_size(m['arguments'])} per device, total {_size(m['total'])}"
        )
    else:
        lines.append(
            f"memory per device: arguments {_size(m['arguments'])}, outputs {_size(m['outputs'])} "
            f"({_size(m['aliased'])} aliased to the arguments), temporaries {_size(m['temporaries'])}, total "
            f"{_size(m['total'])}"
        )
        kernel = (
            f" + {plan.kernel_attention_flops:.3e} of attention in {plan.kernel_calls} kernel calls, counted "
            "analytically"
            if plan.kernel_calls
            else ""
        )
        lines.append(
            f"FLOPs per step: compiled {plan.compiled_flops:.3e} (matmuls of the HLO, each loop body times its trip "
            f"count, x devices{kernel}), analytic {plan.analytic_flops:.3e} (training/flops.py); "
            f"XLA's cost analysis {plan.xla_flops or 0:.3e} (each loop body once)"
        )
    lines.append(f"compile: {plan.compile_seconds:.1f} s")
    return "\n".join(lines)


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.2f} MiB"


@cli.entry_point
def main(argv: list[str] | None = None) -> Plan:
    args = parse_args(argv)
    cli.configure_logging(args)
    target = topology(args.topology)
    if target.platform == "cpu" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", target.chips)
    config = args.config
    config_lib.check_config(config)
    _, model_source = planned_model_config(config)
    if args.search:
        print(f"search on {target.name}: global batch {config.global_batch_size}", flush=True)
        plan, tried = search(config, target)
        if plan is None:
            print(describe(tried[-1], config, model_source))
            print(f"search: even {tried[-1].num_microbatches} micro-batches do not fit")
            plan = tried[-1]
        else:
            print(describe(plan, config, model_source))
            print(
                f"search: fewest micro-batches that fit: {plan.num_microbatches} "
                f"({plan.samples_per_device:g} sample(s) per device per micro-batch); "
                f"--config.num_microbatches={plan.num_microbatches}"
            )
    else:
        plan = compile_plan(config, target)
        print(describe(plan, config, model_source))
    if args.hlo_dump and plan.hlo_text:
        with open(args.hlo_dump, "w") as f:
            f.write(plan.hlo_text)
    print(plan.summary(), flush=True)
    return plan


if __name__ == "__main__":
    main()
