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

Kernel tile choices (`GpuProfile.tiles`): a plain dict in the vocabulary of qoq.runtime_kernels.gemm
(`GemvConfig`, `GemmConfig`: CTA tile bm x bn x 128, wm x wn warps, cp.async stages, min resident
blocks) and .attention (`plan_splits`); `w4a8_tile(profile, m, n, k)` gives the concrete choice for one
GEMM shape. Buckets by M, as the kernels' `choose_config`:

    tiles["w4a8_gemv"]     M <= 16: weight-streaming kernel (tb = ceil(M/8) token blocks), split-K
                           planned to `splits_per_sm` CTAs per SM
    tiles["w4a8_small_m"]  M <= 32;  tiles["w4a8_mid_m"]  M <= 128;  tiles["w4a8_large_m"]  larger M
    tiles["split_k_ctas_per_sm"]  tensor-core kernel: split K until tiles*splits covers the SMs this often
    tiles["kv4_decode"]    decode attention: split the sequence until B*Hkv*splits covers the SMs
                           `ctas_per_sm` times, chunks a multiple of 16 tokens

Stages and min_blocks follow each GPU's shared memory per SM (one 128x128 int8 A + 4-bit B stage is
24 KB): L40S 100 KB -> 3 stages, 1 block; A100 164 KB -> 3 stages, 2 blocks; H100/H200 228 KB ->
4 stages, 2 blocks.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

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
    tiles: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("match")
        return d

    @property
    def memory_bytes(self) -> float:
        """Device memory in bytes: the marketed "80GB" of an H100/A100 is 80 GiB on the card."""
        return self.memory_gb * GIB


def _tiles(stages: int, large_min_blocks: int, ctas_per_sm: float = 1.5) -> dict:
    return {
        "w4a8_gemv": {"max_m": 16, "nt": 2, "warps": 8, "u": 4, "splits_per_sm": 4},
        "w4a8_small_m": {"max_m": 32, "bm": 32, "bn": 128, "wm": 1, "wn": 4, "stages": max(stages, 3),
                         "min_blocks": 3 if stages >= 4 else 2},
        "w4a8_mid_m": {"max_m": 128, "bm": 64, "bn": 128, "wm": 2, "wn": 2, "stages": stages, "min_blocks": 2},
        "w4a8_large_m": {"bm": 128, "bn": 128, "wm": 2, "wn": 2, "stages": stages, "min_blocks": large_min_blocks},
        "split_k_ctas_per_sm": ctas_per_sm,
        "kv4_decode": {"warps": 4, "ctas_per_sm": 2, "chunk_multiple": 16},
        "fused_rows": {"threads_per_row": 256},
    }


PROFILES: dict[str, GpuProfile] = {
    "l40s": GpuProfile(
        name="l40s", full_name="NVIDIA L40S 48GB", memory_gb=48, mem_bw_gbs=864, fp16_tflops=362.05, int8_tops=733,
        fp8_tflops=733, sm_count=142, arch="sm_89", smem_per_sm_kb=100, match=("L40S",),
        source="NVIDIA L40S datasheet (dense tensor figures)",
        tiles=_tiles(stages=3, large_min_blocks=1)),
    "a100": GpuProfile(
        name="a100", full_name="NVIDIA A100 80GB SXM", memory_gb=80, mem_bw_gbs=2039, fp16_tflops=312, int8_tops=624,
        fp8_tflops=None, sm_count=108, arch="sm_80", smem_per_sm_kb=164, match=("A100",),
        source="NVIDIA A100 datasheet, 80GB SXM column (dense tensor figures)",
        tiles=_tiles(stages=3, large_min_blocks=2)),
    "h100": GpuProfile(
        name="h100", full_name="NVIDIA H100 SXM5 80GB", memory_gb=80, mem_bw_gbs=3350, fp16_tflops=989.4,
        int8_tops=1979, fp8_tflops=1979, sm_count=132, arch="sm_90", smem_per_sm_kb=228, match=("H100",),
        source="NVIDIA H100 datasheet, SXM column (dense tensor figures)",
        tiles=_tiles(stages=4, large_min_blocks=2)),
    "h200": GpuProfile(
        name="h200", full_name="NVIDIA H200 SXM 141GB", memory_gb=141, mem_bw_gbs=4800, fp16_tflops=989.4,
        int8_tops=1979, fp8_tflops=1979, sm_count=132, arch="sm_90", smem_per_sm_kb=228, match=("H200",),
        source="NVIDIA H200 datasheet, SXM column (dense tensor figures)",
        tiles=_tiles(stages=4, large_min_blocks=2)),
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
    a named profile that is not the device is kept (its tiles and roofline) with a note saying so.
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
                               "tiles and roofline, measuring on the detected device")


def w4a8_tile(profile: GpuProfile, m: int, n: int, k: int) -> dict:
    """The W4A8 GEMM launch choice for [m, k] x [n, k]^T on `profile`: the M bucket's tile dict plus
    "config" (its name) and "splits" (split-K over 128-wide k-steps, as the kernels plan it)."""
    t = profile.tiles
    k_steps = max(1, math.ceil(k / 128))
    if m <= t["w4a8_gemv"]["max_m"]:
        cfg = dict(t["w4a8_gemv"], config="w4a8_gemv", tb=math.ceil(m / 8))
        groups = math.ceil(math.ceil(n / 32) / cfg["nt"])
        cfg["splits"] = max(1, min(k_steps, math.ceil(cfg["splits_per_sm"] * profile.sm_count / groups)))
        return cfg
    name = next((b for b in ("w4a8_small_m", "w4a8_mid_m") if m <= t[b]["max_m"]), "w4a8_large_m")
    cfg = dict(t[name], config=name)
    tiles = math.ceil(m / cfg["bm"]) * math.ceil(n / cfg["bn"])
    if tiles >= profile.sm_count:
        cfg["splits"] = 1
    else:
        want = math.ceil(t["split_k_ctas_per_sm"] * profile.sm_count / tiles)
        cfg["splits"] = max(1, min(want, k_steps // 2))
    return cfg
