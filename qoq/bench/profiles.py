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

Kernel tile choices (`GpuProfile.tiles`): a plain dict the kernels read by name (qoq.runtime_kernels);
`w4a8_tile(profile, m, n, k)` turns it into one concrete launch configuration for a GEMM of that shape.

    tiles["w4a8_small_m"]  decode-sized M (m <= max_m): narrow M tile, split-K so every SM has work
    tiles["w4a8_large_m"]  prefill-sized M: big CTA tile, multi-stage cp.async pipeline
    tiles["kv4_decode"]    KV4 decode attention: split the sequence when batch*kv_heads < split_below_ctas
    tiles["fused_rows"]    threads per row for the fused RMSNorm/SiLU + INT8 quant kernels

Block sizes are multiples of the packed layout's 32x32 tile; `stages` fit each GPU's shared memory
(L40S: 100 KB per SM, A100: 164 KB, H100/H200: 228 KB).
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


def _tiles(small_block_n: int, small_stages: int, large_block: tuple[int, int, int], large_stages: int,
           large_warps: int, kv_split_below_ctas: int, kv_chunk: int) -> dict:
    bm, bn, bk = large_block
    return {
        "w4a8_small_m": {"max_m": 32, "block_m": 16, "block_n": small_block_n, "block_k": 128, "warps": 4,
                         "stages": small_stages, "split_k": "auto", "target_ctas_per_sm": 2},
        "w4a8_large_m": {"block_m": bm, "block_n": bn, "block_k": bk, "warps": large_warps, "stages": large_stages,
                         "split_k": 1},
        "kv4_decode": {"split_below_ctas": kv_split_below_ctas, "chunk_tokens": kv_chunk, "warps": 4},
        "fused_rows": {"threads_per_row": 256},
    }


PROFILES: dict[str, GpuProfile] = {
    "l40s": GpuProfile(
        name="l40s", full_name="NVIDIA L40S 48GB", memory_gb=48, mem_bw_gbs=864, fp16_tflops=362.05, int8_tops=733,
        fp8_tflops=733, sm_count=142, arch="sm_89", smem_per_sm_kb=100, match=("L40S",),
        source="NVIDIA L40S datasheet (dense tensor figures)",
        tiles=_tiles(small_block_n=64, small_stages=3, large_block=(128, 128, 64), large_stages=3, large_warps=8,
                     kv_split_below_ctas=284, kv_chunk=256)),
    "a100": GpuProfile(
        name="a100", full_name="NVIDIA A100 80GB SXM", memory_gb=80, mem_bw_gbs=2039, fp16_tflops=312, int8_tops=624,
        fp8_tflops=None, sm_count=108, arch="sm_80", smem_per_sm_kb=164, match=("A100",),
        source="NVIDIA A100 datasheet, 80GB SXM column (dense tensor figures)",
        tiles=_tiles(small_block_n=64, small_stages=4, large_block=(128, 128, 64), large_stages=4, large_warps=8,
                     kv_split_below_ctas=216, kv_chunk=256)),
    "h100": GpuProfile(
        name="h100", full_name="NVIDIA H100 SXM5 80GB", memory_gb=80, mem_bw_gbs=3350, fp16_tflops=989.4,
        int8_tops=1979, fp8_tflops=1979, sm_count=132, arch="sm_90", smem_per_sm_kb=228, match=("H100",),
        source="NVIDIA H100 datasheet, SXM column (dense tensor figures)",
        tiles=_tiles(small_block_n=64, small_stages=4, large_block=(128, 256, 64), large_stages=4, large_warps=8,
                     kv_split_below_ctas=264, kv_chunk=256)),
    "h200": GpuProfile(
        name="h200", full_name="NVIDIA H200 SXM 141GB", memory_gb=141, mem_bw_gbs=4800, fp16_tflops=989.4,
        int8_tops=1979, fp8_tflops=1979, sm_count=132, arch="sm_90", smem_per_sm_kb=228, match=("H200",),
        source="NVIDIA H200 datasheet, SXM column (dense tensor figures)",
        tiles=_tiles(small_block_n=64, small_stages=4, large_block=(128, 256, 64), large_stages=4, large_warps=8,
                     kv_split_below_ctas=264, kv_chunk=256)),
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
    """The concrete W4A8 GEMM launch choice for an [m, k] x [n, k]^T product on `profile`.

    Small M: the small-M tile with split-K chosen so that about `target_ctas_per_sm` CTAs run per SM
    (split-K never cuts K below one 128-wide k-block per split). Large M: the large tile, no split.
    """
    small = profile.tiles["w4a8_small_m"]
    if m <= small["max_m"]:
        ctas = math.ceil(m / small["block_m"]) * math.ceil(n / small["block_n"])
        want = small["target_ctas_per_sm"] * profile.sm_count
        max_split = max(1, k // small["block_k"])
        split = max(1, min(max_split, math.ceil(want / max(ctas, 1))))
        while split > 1 and (k // small["block_k"]) % split:
            split -= 1  # an even division of the k-blocks
        return {**{key: v for key, v in small.items() if key not in ("max_m", "target_ctas_per_sm")},
                "split_k": split, "config": "w4a8_small_m"}
    large = profile.tiles["w4a8_large_m"]
    return {**large, "config": "w4a8_large_m"}
