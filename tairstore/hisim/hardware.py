"""GPU hardware profiles: peak throughputs, memory, and the links around the GPU.

Every figure is the vendor's *dense* number (NVIDIA quotes tensor-core FLOP/s "with sparsity" at
twice the dense rate; sparsity is not used by inference engines, so the dense half is recorded).
Link bandwidths are per GPU and per direction, the unit every transfer time here divides by.
Memory (``hbm_gb``) is the datasheet's figure, which for HBM is binary: an "80 GB" H100 reports
81,559 MiB and a "141 GB" H200 143,771 MiB (as AIConfigurator's system files also record them,
80 and 141 GiB); :attr:`GPU.hbm_bytes` reads it so.

Host DRAM, SSD and network bandwidths belong to the server, not to the GPU; they are separate
fields with documented defaults so that a deployment can override them (``with_overrides`` or a TOML
file) without pretending to know a GPU's neighbours.

User profiles are TOML::

    [gpu.my-h20]
    base = "h20"            # optional: start from a built-in profile
    hbm_gb = 141
    ssd_gbps = 28.0

Any field of :class:`GPU` may be set; ``aliases`` is a list of extra names.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# Server defaults (per GPU), overridable per deployment.
# Dual-socket Sapphire Rapids hosts (HGX H100/H200 servers) have 8 DDR5-4800 channels per socket,
# 8 x 38.4 GB/s (JEDEC DDR5-4800) = 307 GB/s per socket.
DEFAULT_HOST_DRAM_GBPS = 307.2
# One PCIe Gen4 x4 NVMe data-center drive per GPU, e.g. Samsung PM9A3: 6.9 GB/s sequential read.
DEFAULT_SSD_GBPS = 6.9
# One 400 Gb/s ConnectX-7 NIC per GPU as in DGX H100 (NVIDIA DGX H100 datasheet): 50 GB/s.
DEFAULT_NETWORK_GBPS = 50.0


class UnknownGPUError(KeyError):
    """No profile has this name or alias."""


@dataclass(frozen=True)
class GPU:
    """One GPU model's datasheet figures plus the server bandwidths around it.

    ``fp8_tflops`` is None on GPUs without FP8 tensor cores (A100); FP8 work then runs at the bf16
    rate, as FP8 weights are upcast. ``aic_system`` names the AIConfigurator system whose measured
    tables describe this GPU ("h100_sxm"), or None when only the roofline path applies.
    """

    name: str
    arch: str
    bf16_tflops: float
    fp8_tflops: float | None
    hbm_gb: float
    hbm_tbps: float
    nvlink_gbps: float  # 0 where GPUs only talk over PCIe
    pcie_gbps: float
    host_dram_gbps: float = DEFAULT_HOST_DRAM_GBPS
    ssd_gbps: float = DEFAULT_SSD_GBPS
    network_gbps: float = DEFAULT_NETWORK_GBPS
    aic_system: str | None = None
    aliases: tuple[str, ...] = ()

    def peak_flops(self, dtype: str) -> float:
        """Dense tensor-core FLOP/s for a GEMM input dtype ("bfloat16", "fp8", "fp8_block")."""
        if dtype.startswith("fp8") and self.fp8_tflops is not None:
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12

    @property
    def hbm_bytes(self) -> float:
        """HBM capacity in bytes (``hbm_gb`` GiB: HBM stacks come in binary sizes)."""
        return self.hbm_gb * 2**30

    @property
    def hbm_bytes_per_s(self) -> float:
        """HBM bandwidth in bytes per second."""
        return self.hbm_tbps * 1e12

    @property
    def interconnect_bytes_per_s(self) -> float:
        """Per-direction bandwidth of the link tensor parallelism uses (NVLink, else PCIe)."""
        return (self.nvlink_gbps or self.pcie_gbps) * 1e9

    def with_overrides(self, **fields: Any) -> "GPU":
        """A copy with some fields replaced (e.g. ``ssd_gbps=28.0`` for a four-drive RAID)."""
        return dataclasses.replace(self, **fields)


BUILTIN_GPUS: tuple[GPU, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: BF16 1,979 / FP8 3,958 TFLOPS with
    # sparsity; 80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s; PCIe Gen5 128 GB/s (both directions).
    GPU("h100_sxm", "hopper", bf16_tflops=989.5, fp8_tflops=1979.0, hbm_gb=80, hbm_tbps=3.35,
        nvlink_gbps=450.0, pcie_gbps=64.0, aic_system="h100_sxm", aliases=("h100", "h100-sxm")),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: same tensor cores as H100 SXM;
    # 141 GB HBM3e at 4.8 TB/s; NVLink 900 GB/s; PCIe Gen5 128 GB/s.
    GPU("h200_sxm", "hopper", bf16_tflops=989.5, fp8_tflops=1979.0, hbm_gb=141, hbm_tbps=4.8,
        nvlink_gbps=450.0, pcie_gbps=64.0, aic_system="h200_sxm", aliases=("h200", "h200-sxm")),
    # NVIDIA H20 product brief: BF16 148 / FP8 296 TFLOPS dense; 96 GB HBM3 at 4.0 TB/s;
    # NVLink 900 GB/s; PCIe Gen5 x16.
    GPU("h20", "hopper", bf16_tflops=148.0, fp8_tflops=296.0, hbm_gb=96, hbm_tbps=4.0,
        nvlink_gbps=450.0, pcie_gbps=64.0),
    # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: BF16 312 TFLOPS (624 with
    # sparsity), no FP8; 80 GB HBM2e at 2,039 GB/s; NVLink 600 GB/s; PCIe Gen4 64 GB/s.
    GPU("a100_sxm_80g", "ampere", bf16_tflops=312.0, fp8_tflops=None, hbm_gb=80, hbm_tbps=2.039,
        nvlink_gbps=300.0, pcie_gbps=32.0, aliases=("a100", "a100-80gb", "a100_sxm")),
    # NVIDIA L20 datasheet: BF16 119.5 / FP8 239 TFLOPS dense (FP32 59.8); 48 GB GDDR6 at
    # 864 GB/s; no NVLink; PCIe Gen4 x16 64 GB/s.
    GPU("l20", "ada", bf16_tflops=119.5, fp8_tflops=239.0, hbm_gb=48, hbm_tbps=0.864,
        nvlink_gbps=0.0, pcie_gbps=32.0),
    # NVIDIA DGX B200 datasheet, divided by its 8 GPUs: FP8 72 PFLOPS and BF16-class 36 PFLOPS
    # with sparsity -> 4.5 / 2.25 PFLOPS dense per GPU; 1,440 GB HBM3e at 64 TB/s -> 180 GB at
    # 8 TB/s; fifth-generation NVLink 1.8 TB/s per GPU; PCIe Gen5.
    GPU("b200", "blackwell", bf16_tflops=2250.0, fp8_tflops=4500.0, hbm_gb=180, hbm_tbps=8.0,
        nvlink_gbps=900.0, pcie_gbps=64.0, aliases=("b200-sxm",)),
)


class GPURegistry:
    """GPU profiles by name or alias (case-insensitive; '-' and '_' are the same)."""

    def __init__(self, gpus: Iterable[GPU] = BUILTIN_GPUS) -> None:
        self._by_name: dict[str, GPU] = {}
        for gpu in gpus:
            self.add(gpu)

    @staticmethod
    def _norm(name: str) -> str:
        return name.strip().lower().replace("-", "_")

    def add(self, gpu: GPU) -> None:
        """Register a profile under its name and aliases (replacing any of the same name)."""
        for name in (gpu.name, *gpu.aliases):
            self._by_name[self._norm(name)] = gpu

    def get(self, name: str) -> GPU:
        """Return the profile for ``name``.

        Raises:
            UnknownGPUError: no profile has this name or alias.
        """
        try:
            return self._by_name[self._norm(name)]
        except KeyError:
            known = ", ".join(self.names())
            raise UnknownGPUError(f"unknown GPU {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        """Canonical names of all profiles."""
        return sorted({gpu.name for gpu in self._by_name.values()})

    def load_toml(self, path: Path | str) -> list[GPU]:
        """Add the ``[gpu.NAME]`` profiles of a TOML file; return them.

        Raises:
            UnknownGPUError: a ``base`` names no known profile.
            TypeError: a section sets a field :class:`GPU` does not have.
        """
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        added = []
        for name, fields in doc.get("gpu", {}).items():
            fields = dict(fields)
            base_name = fields.pop("base", None)
            if "aliases" in fields:
                fields["aliases"] = tuple(fields["aliases"])
            if base_name is not None:
                # A derived profile inherits figures, not names or measured tables.
                gpu = dataclasses.replace(self.get(base_name), name=name, aliases=(),
                                          aic_system=None)
                gpu = dataclasses.replace(gpu, **fields)
            else:
                gpu = GPU(name=name, **fields)
            self.add(gpu)
            added.append(gpu)
        return added


DEFAULT_REGISTRY = GPURegistry()


def get_gpu(name: str) -> GPU:
    """Look a built-in (or previously added) GPU profile up by name or alias."""
    return DEFAULT_REGISTRY.get(name)
