"""GPU profiles for `qoq bench --gpu NAME`: datasheet peaks, memory, SM count and kernel tile choices.

Figures are NVIDIA datasheet numbers for *dense* tensor-core math (the "with sparsity" figures are
twice these) and are used as the roofline that `qoq bench` reports fractions of:

- L40S (48 GB GDDR6, PCIe):  NVIDIA L40S datasheet: 864 GB/s; FP16/BF16 tensor 362.05 TFLOPS,
  INT8 733 TOPS, FP8 733 TFLOPS (dense); 142 SMs (Ada, sm_89).
- A100 80GB SXM:             NVIDIA A100 datasheet: 2039 GB/s; FP16/BF16 tensor 312 TFLOPS,
  INT8 624 TOPS (dense); no FP8; 108 SMs (Ampere, sm_80).
- H100 SXM5 80GB:            NVIDIA H100 datasheet (SXM column): 3350 GB/s; FP16/BF16 tensor 989.4 TFLOPS,
  INT8 1979 TOPS, FP8 1979 TFLOPS (dense); 132 SMs (Hopper, sm_90).
- H200 SXM 141GB:            NVIDIA H200 datasheet: 4800 GB/s, 141 GB HBM3e; tensor math as H100 SXM
  (989.4 FP16, 1979 INT8/FP8 dense); 132 SMs (sm_90).

Kernel choices (`GpuProfile.tiles`, the profile's "tiles" in the bench JSON): what
`qoq.runtime_kernels.gemm.choose_config` launches on that GPU (its SM count and compute capability) for the
Llama-3-8B linear shapes, by M: `{"NxK": {"M": {"kernel": "GemvConfig" | "GemmConfig" | "IntMMConfig" |
"WgmmaConfig", ...the config's fields}}}`. Computed from the dispatcher itself, so it cannot drift from it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from qoq.errors import QoqError

GIB = 2**30


@dataclass(frozen=True)
class GpuProfile:
    name: str  # l40s | a100 | h100 | h200
    full_name: str
    memory_gb: float  # GB as marketed (10^9 bytes)
    mem_bw_gbs: float  # peak DRAM bandwidth, GB/s
    fp16_tflops: float  # dense FP16 tensor-core throughput (FP32 accumulate)
    int8_tops: float  # dense INT8 tensor-core throughput
    fp8_tflops: float | None  # dense FP8 tensor-core throughput; None where the GPU has none
    sm_count: int
    arch: str  # sm_80 | sm_89 | sm_90
    smem_per_sm_kb: int
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that identify it
    source: str

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("match")
        d["tiles"] = self.tiles
        return d

    @property
    def tiles(self) -> dict:
        return gemm_dispatch(self)

    @property
    def memory_bytes(self) -> float:
        """Device memory in bytes: the marketed "80GB" of an H100/A100 is 80 GiB on the card."""
        return self.memory_gb * GIB


DISPATCH_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # Llama-3-8B: qkv, o, gate_up, down
DISPATCH_MS = (1, 16, 32, 64, 256, 1024, 4096)


def gemm_dispatch(profile: GpuProfile) -> dict:
    """{"NxK": {"M": {"kernel": config class, **its fields}}}: the W4A8 GEMM launch on `profile`'s GPU."""
    from dataclasses import asdict as fields_of

    from qoq.runtime_kernels.gemm import choose_config

    cc = int(profile.arch.removeprefix("sm_"))
    out = {}
    for n, k in DISPATCH_SHAPES:
        by_m = {}
        for m in DISPATCH_MS:
            cfg = choose_config(m, n, k, profile.sm_count, cc=cc)
            by_m[str(m)] = {"kernel": type(cfg).__name__, **fields_of(cfg)}
        out[f"{n}x{k}"] = by_m
    return out


PROFILES: dict[str, GpuProfile] = {
    "l40s": GpuProfile(
        name="l40s", full_name="NVIDIA L40S 48GB", memory_gb=48, mem_bw_gbs=864, fp16_tflops=362.05, int8_tops=733,
        fp8_tflops=733, sm_count=142, arch="sm_89", smem_per_sm_kb=100, match=("L40S",),
        source="NVIDIA L40S datasheet (dense tensor figures)"),
    "a100": GpuProfile(
        name="a100", full_name="NVIDIA A100 80GB SXM", memory_gb=80, mem_bw_gbs=2039, fp16_tflops=312, int8_tops=624,
        fp8_tflops=None, sm_count=108, arch="sm_80", smem_per_sm_kb=164, match=("A100",),
        source="NVIDIA A100 datasheet, 80GB SXM column (dense tensor figures)"),
    "h100": GpuProfile(
        name="h100", full_name="NVIDIA H100 SXM5 80GB", memory_gb=80, mem_bw_gbs=3350, fp16_tflops=989.4,
        int8_tops=1979, fp8_tflops=1979, sm_count=132, arch="sm_90", smem_per_sm_kb=228, match=("H100",),
        source="NVIDIA H100 datasheet, SXM column (dense tensor figures)"),
    "h200": GpuProfile(
        name="h200", full_name="NVIDIA H200 SXM 141GB", memory_gb=141, mem_bw_gbs=4800, fp16_tflops=989.4,
        int8_tops=1979, fp8_tflops=1979, sm_count=132, arch="sm_90", smem_per_sm_kb=228, match=("H200",),
        source="NVIDIA H200 datasheet, SXM column (dense tensor figures)"),
}
GPU_CHOICES = (*PROFILES, "auto")
# When the device matches no profile by name: nearest by compute capability.
_BY_CAPABILITY = {(8, 0): "a100", (8, 6): "l40s", (8, 7): "a100", (8, 9): "l40s", (9, 0): "h100"}


@dataclass
class DeviceInfo:
    """What the measuring device is (as torch reports it)."""

    name: str
    memory_bytes: int
    sm_count: int
    capability: tuple[int, int]

    def as_dict(self) -> dict:
        return {"name": self.name, "memory_gb": round(self.memory_bytes / 1e9, 2), "sm_count": self.sm_count,
                "capability": f"{self.capability[0]}.{self.capability[1]}"}


def get_profile(name: str) -> GpuProfile:
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise QoqError(f"--gpu {name!r} is not one of {', '.join(GPU_CHOICES)}") from None


def profile_for_device_name(device_name: str) -> GpuProfile | None:
    upper = device_name.upper()
    for p in PROFILES.values():
        if any(m.upper() in upper for m in p.match):
            return p
    return None


def detect_device() -> DeviceInfo:
    """The visible CUDA device; one-line QoqError when there is none."""
    import torch

    if not torch.cuda.is_available():
        raise QoqError("qoq bench needs an NVIDIA GPU (none visible); run it on a GPU machine")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return DeviceInfo(name=props.name, memory_bytes=int(props.total_memory), sm_count=int(props.multi_processor_count),
                      capability=(int(props.major), int(props.minor)))


def resolve_profile(gpu: str, device: DeviceInfo) -> tuple[GpuProfile, GpuProfile | None, str | None]:
    """(profile to use, profile matching the device or None, one-line note or None).

    `auto` picks the device's profile by name (else the nearest by compute capability, with a note);
    a named profile that is not the device is kept (its roofline) with a note saying so.
    """
    detected = profile_for_device_name(device.name)
    if gpu.lower() == "auto":
        if detected is not None:
            return detected, detected, None
        nearest = PROFILES[_BY_CAPABILITY.get(device.capability, "a100")]
        return nearest, None, (f"{device.name} matches no profile; using the nearest, {nearest.name} "
                               f"(sm_{device.capability[0]}{device.capability[1]}); pass --gpu to choose")
    profile = get_profile(gpu)
    if detected is profile:
        return profile, detected, None
    return profile, detected, (f"detected {device.name}, not {profile.full_name}: using the {profile.name} profile's "
                               "roofline, measuring on the detected device (whose kernels pick their own tiles)")
