"""The targets a run can be planned for (`python -m avllm_jax.plan --topology=NAME`): Cloud TPU
slices (compiled by libtpu on a CPU host), `cpu:N` (N host devices) and GPU machines (the CPU
compiler's estimate for their mesh), each with its devices and memory per device."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax

from avllm_jax.errors import AvllmError, install_command


class PlanError(AvllmError, RuntimeError):
    """A plan that cannot be made (unknown topology, missing compiler, bad batch split)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    platform: str  # what compiles it: 'tpu' (libtpu) or 'cpu' (host devices, also for GPUs)
    chips: int
    hbm_gib: float | None  # per chip; None for cpu:N
    libtpu_name: str = ""  # e.g. 'v5:2x2x4'
    chips_per_host: tuple[int, int, int] = (1, 1, 1)
    chip_config: str = "default"  # 'megacore': a chip's two TensorCores are one device
    note: str = ""


# Cloud TPU names count TensorCores on v4 and v5p (2 per chip) and chips on v5e and v6e.
_TPU_GENERATIONS = {  # name: (libtpu name, HBM GiB per chip, cores per chip in the name)
    "v4": ("v4", 32.0, 2),
    "v5p": ("v5", 95.0, 2),
    "v5e": ("v5e", 16.0, 1),
    "v6e": ("v6e", 32.0, 1),
}
_CUBE_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
_PLANE_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GPU_HBM_GIB = {"a100-40gb": 40.0, "a100-80gb": 80.0, "h100-80gb": 80.0, "h200-141gb": 141.0}


def _tpu_topologies() -> dict[str, Topology]:
    table = {}
    for generation, (libtpu, hbm, cores) in _TPU_GENERATIONS.items():
        for chips, shape in (_CUBE_SHAPES if cores == 2 else _PLANE_SHAPES).items():
            # Hosts hold 4 chips (2x2); single-host v5e/v6e slices hold up to 8.
            per_host = (2, 2, 1) if chips >= 4 else (1, 1, 1)
            if cores == 1 and chips == 8:
                per_host = (2, 4, 1)
            table[f"{generation}-{chips * cores}"] = Topology(
                f"{generation}-{chips * cores}",
                "tpu",
                chips,
                hbm,
                f"{libtpu}:{shape}",
                per_host,
                "megacore" if cores == 2 else "default",
            )
    return table


TPU_TOPOLOGIES = _tpu_topologies()


def topology(name: str) -> Topology:
    """The target a name stands for; an unknown name lists the valid ones."""
    if name in TPU_TOPOLOGIES:
        return TPU_TOPOLOGIES[name]
    if match := re.fullmatch(r"cpu:(\d+)", name):
        return Topology(name, "cpu", int(match[1]), None)
    if (match := re.fullmatch(r"(.+)-(\d+)", name)) and match[1] in _GPU_HBM_GIB:
        return Topology(
            name,
            "cpu",
            int(match[2]),
            _GPU_HBM_GIB[match[1]],
            note="the CPU compiler's estimate for this mesh; a GPU compiler lays memory out differently",
        )
    raise PlanError(
        f"unknown topology {name!r}; valid: {', '.join(TPU_TOPOLOGIES)}, cpu:N (N host devices), "
        f"and GPU machines {', '.join(f'{gpu}-N' for gpu in _GPU_HBM_GIB)} (N GPUs)"
    )


def libtpu_installed() -> bool:
    """Whether libtpu (the TPU compiler) can be imported; nothing is loaded."""
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(target: Topology) -> list:
    if target.platform == "tpu":
        if not libtpu_installed():
            raise PlanError(f"{target.name} is compiled by libtpu, which is not installed: {install_command('tpu')}")
        from jax.experimental import topologies

        # libtpu locks the host's chips against a second process; compiling uses none, and
        # without this two plans (or a plan beside a test) could not run at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        return topologies.get_topology_desc(
            target.libtpu_name,
            "tpu",
            chip_config_name=target.chip_config,
            chips_per_host_bounds=target.chips_per_host,
            num_slices=1,
        ).devices
    devices = jax.devices("cpu")
    if len(devices) < target.chips:
        raise PlanError(
            f"{target.name} needs {target.chips} host devices, this process has {len(devices)} "
            "(the planner sets jax_num_cpu_devices before JAX starts; XLA_FLAGS can override it)"
        )
    return devices[: target.chips]
