"""`qoq.quantize(...)`: model source -> calibration -> per-block transforms and quantization -> artifact."""
from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qoq.algorithm.progressive import dequantize, quantize_weight
from qoq.algorithm.smooth_attention import fuse_smooth_attention, smooth_attention_scales
from qoq.calibration.blocks import BlockRunner
from qoq.errors import QoqError
from qoq.formats.artifact import quantization_config, quantized_tensors, write_artifact
from qoq.models.arch import block_linears, head_dims
from qoq.progress import Reporter
from qoq.state import remember_last_artifact

DEFAULT_GROUP = 128
ERROR_SAMPLES = 4  # calibration samples used to measure each block's output error


@dataclass
class QuantizeOptions:
    model: str | None = None
    calib: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 1024
    group_size: int = DEFAULT_GROUP
    smooth_attn_alpha: float = 0.5
    device: str = "auto"
    output: Path | None = None
    overwrite: bool = False
    batch_size: int = 4
    seed: int = 42

    def validate(self) -> None:
        if self.group_size not in (32, 64, 128, -1):
            raise QoqError(f"--group {self.group_size} is not supported; use 32, 64, 128 or -1 (per-channel)")
        if self.calib_samples < 1 or self.calib_seqlen < 8:
            raise QoqError("--calib-samples must be >= 1 and --calib-seqlen >= 8")
        if not 0.0 <= self.smooth_attn_alpha <= 1.0:
            raise QoqError(f"--smooth-attn-alpha {self.smooth_attn_alpha} is outside [0, 1]; 0 turns it off")
        if self.device not in ("auto", "cpu", "cuda"):
            raise QoqError(f"--device {self.device!r} is not one of auto, cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise QoqError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if self.output is not None and Path(self.output).exists() and not self.overwrite:
            raise QoqError(f"output folder {self.output} already exists; pass --overwrite or choose another --output")

    def recipe(self) -> dict:
        return {"name": "rtn", "weights": "rtn", "smooth_attention": {"alpha": self.smooth_attn_alpha, "beta": 0.0}}


@dataclass
class QuantizeResult:
    path: Path
    report: dict = field(default_factory=dict)
    model: object = None  # the in-memory model with every quantized linear replaced by its W_hat (CPU)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_output(name: str, group_size: int) -> Path:
    return Path(f"{name}-qoq-w4a8kv4-{'gchn' if group_size == -1 else f'g{group_size}'}")


def quantize(opts: QuantizeOptions, reporter: Reporter | None = None) -> QuantizeResult:
    """Quantize a model to a QoQ W4A8KV4 artifact and return where it was written."""
    from qoq.calibration.data import load_calibration
    from qoq.models.sources import load_model

    reporter = reporter or Reporter()
    opts.validate()
    device = resolve_device(opts.device)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    with reporter.status("loading the model"):
        loaded = load_model(opts.model, dtype=torch.float32 if device.type == "cpu" else torch.float16)
    output = Path(opts.output) if opts.output is not None else default_output(loaded.name, opts.group_size)
    if output.exists() and not opts.overwrite:
        raise QoqError(f"output folder {output} already exists; pass --overwrite or choose another --output")
    reporter.info(f"model: {loaded.source} ({loaded.architecture}, {sum(p.numel() for p in loaded.model.parameters())/1e6:.0f}M parameters)")
    timings["load_model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with reporter.status("preparing calibration data"):
        calib = load_calibration(opts.calib, loaded.tokenizer, n_samples=opts.calib_samples,
                                 seqlen=opts.calib_seqlen, model=loaded.model, seed=opts.seed)
    reporter.info(f"calibration: {calib.description}")
    timings["calibration_data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tensors, modules, layer_reports = quantize_model(loaded.model, calib.input_ids, opts, device, reporter)
    timings["quantize_s"] = time.perf_counter() - t0

    config = artifact_config(loaded.model, opts.group_size, modules, opts.recipe())
    report = {
        "source": {"model": loaded.source, "reload": loaded.reload_spec, "sha256": loaded.source_sha256,
                   "architecture": loaded.architecture},
        "calibration": {"description": calib.description, "sha256": calib.sha256,
                        "samples": opts.calib_samples, "seqlen": opts.calib_seqlen},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "device": str(device),
        "layers": layer_reports,
        "sizes": artifact_sizes(loaded.model, tensors),
        "timings": timings,
        "versions": versions(),
    }
    t0 = time.perf_counter()
    with reporter.status(f"writing {output}"):
        path = write_artifact(output, config, tensors, report, tokenizer=loaded.tokenizer, overwrite=opts.overwrite)
    timings["write_s"] = time.perf_counter() - t0
    remember_last_artifact(path)
    return QuantizeResult(path=path, report=report, model=loaded.model)


@torch.no_grad()
def quantize_model(model, input_ids: torch.Tensor, opts: QuantizeOptions, device: torch.device,
                   reporter: Reporter) -> tuple[dict, dict, list]:
    """Run every block once over the calibration set, transform and quantize it, and collect the tensors."""
    heads, kv_heads, _ = head_dims(model.config)
    runner = BlockRunner(model, input_ids, device, batch_size=opts.batch_size)
    tensors = {"model.embed_tokens.weight": model.get_input_embeddings().weight.detach().half().cpu()}
    modules, layer_reports = {}, []
    for i, layer in enumerate(reporter.track(runner.layers, "quantizing blocks")):
        started = time.perf_counter()
        layer.to(device=device, dtype=torch.float32)
        outputs, stats = runner.forward_with_stats(layer)
        linears = block_linears(layer)
        if opts.smooth_attn_alpha > 0:
            lam = smooth_attention_scales(stats.key_absmax, opts.smooth_attn_alpha, runner.head_dim)
            fuse_smooth_attention(linears["self_attn.q_proj"], linears["self_attn.k_proj"], lam, heads, kv_heads)
        prefix = f"model.layers.{i}"
        weight_errors = {}
        for name, linear in linears.items():
            full = f"{prefix}.{name}"
            qw = quantize_weight(linear.weight, opts.group_size)
            w_hat = dequantize(qw).to(linear.weight.dtype)
            weight_errors[name] = float((w_hat - linear.weight).norm() / linear.weight.norm().clamp_min(1e-12))
            linear.weight.data.copy_(w_hat)
            tensors.update(quantized_tensors(full, _to_cpu(qw), linear.bias))
            modules[full] = tuple(linear.weight.shape)
        block_error = _relative_error(runner.forward(layer, limit=ERROR_SAMPLES), outputs[:ERROR_SAMPLES])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{norm}.weight"] = layer.get_submodule(norm).weight.detach().half().cpu()
        layer_reports.append({"layer": i, "block_output_rel_error": block_error, "weight_rel_error": weight_errors,
                              "seconds": time.perf_counter() - started})
        runner.advance(outputs)
        layer.to("cpu")
    tensors["model.norm.weight"] = model.model.norm.weight.detach().half().cpu()
    if not model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = model.get_output_embeddings().weight.detach().half().cpu()
    return tensors, modules, layer_reports


def artifact_config(model, group_size: int, modules: dict, recipe: dict) -> dict:
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "torch_dtype", "dtype"):
        config.pop(key, None)
    config["torch_dtype"] = "float16"
    config["quantization_config"] = quantization_config(group_size, modules, recipe)
    return config


def artifact_sizes(model, tensors: dict) -> dict:
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"fp16_bytes": fp16_bytes, "artifact_bytes": stored, "compression": fp16_bytes / stored}


def versions() -> dict:
    import transformers

    from qoq import __version__
    return {"qoq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def sha256_of_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _to_cpu(qw):
    for name in ("q", "s1", "s2", "z", "szeros"):
        t = getattr(qw, name)
        if t is not None:
            setattr(qw, name, t.cpu())
    return qw
