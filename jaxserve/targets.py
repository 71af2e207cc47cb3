"""Compile-only accelerators on a machine that has none: TPU v5e/v6e and NVIDIA H100/H200.

``jax.experimental.topologies.get_topology_desc`` returns devices that can be compiled for but not run
on.  Lowering with ``jax.ShapeDtypeStruct`` arguments sharded over a ``Mesh`` of them and calling
``.compile()`` runs the real compilers (XLA TPU + Mosaic for Pallas TPU kernels; XLA GPU + Triton +
ptxas for Pallas Triton kernels), and ``compiled.memory_analysis()`` gives the bytes per device.

Requirements: ``jax[tpu]`` (libtpu) for the TPU targets and ``jax[cuda12]`` or ``jax[cuda13]`` (the
CUDA plugin and ptxas) for the GPU ones, at the version of ``jax``; run with ``JAX_PLATFORMS=cpu`` so
that neither backend tries to open a real device.  ``pip install -e ".[compile]"`` installs both.

GPU targets are described by a ``GpuTargetConfigProto`` in text form.  The ones below are written for
this project with only the fields the compiler reads (compute capability, shared memory, core and
register counts, memory size), from the NVIDIA data sheets of the two chips.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

TPU_TARGETS = {  # name -> (topology name of get_topology_desc, HBM bytes per chip, chip name)
    "tpu-v5e": ("v5e", 16 * 2**30, "TPU v5 lite"),
    "tpu-v6e": ("v6e", 32 * 2**30, "TPU v6 lite"),
}

_GPU_TEMPLATE = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
    minor: 0
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
  patch: 0
}}
device_description_str: "{name}"
"""

GPU_TARGETS = {  # name -> (HBM bytes, HBM bytes/s, device name)
    "h100": (84942979072, 3352320000000, "NVIDIA H100 80GB HBM3"),
    "h200": (151397597184, 4800000000000, "NVIDIA H200 141GB HBM3e"),
}
GPU_SHARED_MEMORY_PER_BLOCK = 232448  # opt-in shared memory per block on sm_90 (both chips)

TARGETS = tuple(TPU_TARGETS) + tuple(GPU_TARGETS)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # one of TARGETS
    platform: str  # "tpu" or "gpu"
    devices: tuple[Any, ...]  # compile-only devices, in topology order
    hbm_bytes: int  # memory per chip
    shared_memory_per_block: int | None = None  # GPU only

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def gpu_target_config(name: str) -> str:
    memory, bandwidth, device = GPU_TARGETS[name]
    return _GPU_TEMPLATE.format(memory=memory, bandwidth=bandwidth, name=device)


def _check_target(name: str) -> None:
    if name not in TARGETS:
        raise ValueError(f"target: unknown target {name!r}; known targets: {', '.join(TARGETS)}")


def default_topology(name: str, num_devices: int = 1) -> str:
    """The smallest topology of ``name`` with at least ``num_devices`` chips."""
    _check_target(name)
    if name in GPU_TARGETS:
        return f"1x1x{num_devices}"
    for topo in ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"):
        x, y = map(int, topo.split("x"))
        if x * y >= num_devices:
            return topo
    raise ValueError(f"topology: no {name} slice has {num_devices} chips")


def cuda_plugin() -> str | None:
    """The installed CUDA plugin of jax (``xla_cuda13`` or ``xla_cuda12``; either compiles for the GPU
    targets), or None."""
    import importlib

    for mod in ("xla_cuda13", "xla_cuda12"):
        try:
            importlib.import_module(f"jax_plugins.{mod}")
            return mod
        except ImportError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def get_target(name: str, topology: str | None = None) -> Target:
    """Compile-only devices of ``name`` (``tpu-v5e``, ``tpu-v6e``, ``h100``, ``h200``) in ``topology``
    (TPU: ``"2x2"``-style chip grids, default ``1x1``; GPU: ``"1x1xN"`` for N GPUs in one host, default
    one GPU).  Raises ``RuntimeError`` naming the missing package when the compiler is not installed."""
    from jax.experimental import topologies

    _check_target(name)
    if name in TPU_TARGETS:
        chip, hbm, _ = TPU_TARGETS[name]
        topology = topology or "1x1"
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            import libtpu  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"target {name}: libtpu is not installed; pip install 'jax[tpu]==<jax version>' "
                               "(or pip install -e '.[compile]')") from e
        dims = tuple(int(x) for x in topology.split("x"))
        kwargs = {}
        if len(dims) == 2 and dims[0] * dims[1] < 4:  # smaller than one 2x2 host: a host of that size
            kwargs["chips_per_host_bounds"] = (*dims, 1)
        desc = topologies.get_topology_desc(f"{chip}:{topology}", "tpu", **kwargs)
        return Target(name, "tpu", tuple(desc.devices), hbm)
    memory, _, _ = GPU_TARGETS[name]
    topology = topology or "1x1x1"
    if cuda_plugin() is None:
        raise RuntimeError(f"target {name}: the CUDA plugin is not installed; pip install "
                           "'jax[cuda12]==<jax version>' or 'jax[cuda13]==<jax version>' "
                           "(or pip install -e '.[compile]')")
    desc = topologies.get_topology_desc("cuda", "cuda", target_config=gpu_target_config(name),
                                        topology=topology)
    return Target(name, "gpu", tuple(desc.devices), memory, GPU_SHARED_MEMORY_PER_BLOCK)


def set_default_device(target: Target) -> None:
    """Make ``target``'s first device the default one, so that Pallas lowers for its chip generation."""
    import jax

    jax.config.update("jax_default_device", target.devices[0])
