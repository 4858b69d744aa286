"""`qoq.quantize(...)`: model source -> calibration -> per-block transforms and quantization -> artifact."""
from __future__ import annotations

import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qoq import recipe as recipe_mod
from qoq.calibration.parallel import SINGLE_PROCESS, DataParallelGroup, join_ranks, leave_ranks
from qoq.checks import require_finite_source
from qoq.errors import QoqError, arg
from qoq.runtime.backend import resolve_device
from qoq.scheme.progressive import group_label, group_size_problem
from qoq.formats.artifact import quantization_config, write_artifact
from qoq.formats.resume import CHECKPOINT_SECONDS, Checkpoints, load_resume_point, saved_state
from qoq.formats.shards import SHARD_BYTES, ShardWriter
from qoq.output import (PartialFolder, adopt_partial, check_output, create_partial, drop_owner_record,
                        remove_stale_partials, resumable_partials)
from qoq.progress import Reporter
from qoq.recipe import RECIPES, RecipeOptions
from qoq.state import remember_last_artifact

DEFAULT_GROUP = 128
CALIB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class QuantizeOptions:
    model: str | None = None
    calib: str | None = None
    calib_samples: int | None = None  # None: the paper's 128 x 1024, smaller for data-free on CPU (calibration.data)
    calib_seqlen: int | None = None
    group_size: int = DEFAULT_GROUP
    recipe_name: str = "qoq"  # "qoq" (full recipe) or "rtn" (progressive RTN + SmoothAttention)
    # per-step switches; None = the recipe's default
    rotation: bool | None = None
    smooth_linear: bool | None = None
    reorder: bool | None = None
    gptq: bool | None = None
    clip_search: bool | None = None
    smooth_attn_search: bool | None = None
    smooth_attn_alpha: float | None = None  # fixed alpha (turns the search off unless asked for); 0 = off
    calib_dtype: str = "auto"  # compute dtype of the calibration passes: auto | float32 | bfloat16
    device: str = "auto"
    output: Path | None = None
    overwrite: bool = False
    batch_size: int = 4
    seed: int = 42
    stream: bool = True  # HF safetensors folders: read one block at a time instead of loading the model
    resume: bool = False  # continue the interrupted run of the same output (same model, data and options)

    def validate(self) -> None:
        if group_size_problem(self.group_size):
            raise QoqError(f"--group {self.group_size} {group_size_problem(self.group_size)}")
        if (self.calib_samples is not None and self.calib_samples < 1) or \
                (self.calib_seqlen is not None and self.calib_seqlen < 8):
            raise QoqError("--calib-samples must be >= 1 and --calib-seqlen >= 8")
        if self.batch_size < 1:
            raise QoqError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.recipe_name not in RECIPES:
            raise QoqError(f"--recipe {self.recipe_name!r} is not one of {', '.join(RECIPES)}")
        if self.smooth_attn_alpha is not None and not 0.0 <= self.smooth_attn_alpha <= 1.0:
            raise QoqError(f"--smooth-attn-alpha {self.smooth_attn_alpha} is outside [0, 1]; 0 turns it off")
        if self.smooth_attn_alpha == 0 and self.smooth_attn_search:
            raise QoqError("--smooth-attn-alpha 0 turns SmoothAttention off, which contradicts --smooth-attn-search")
        if self.calib_dtype not in ("auto", *CALIB_DTYPES):
            raise QoqError(f"--calib-dtype {self.calib_dtype!r} is not one of auto, {', '.join(CALIB_DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise QoqError(f"--device {self.device!r} is not one of auto, cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise QoqError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")

    def recipe_options(self) -> RecipeOptions:
        search = self.smooth_attn_search
        if search is None and self.smooth_attn_alpha is not None:
            search = False  # an explicit alpha means that alpha
        return RecipeOptions.preset(self.recipe_name, rotation=self.rotation, smooth_linear=self.smooth_linear,
                                    reorder=self.reorder, gptq=self.gptq, clip_search=self.clip_search,
                                    smooth_attn_search=search, smooth_attn_alpha=self.smooth_attn_alpha)

    def recipe(self, config) -> dict:
        """The recipe as recorded in the artifact (quantization_config["recipe"] and the report)."""
        return self.recipe_options().record(config, self.group_size)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.calib_dtype == "auto":
            return recipe_mod.default_compute_dtype(device)
        return CALIB_DTYPES[self.calib_dtype]


@dataclass
class QuantizeResult:
    path: Path
    report: dict = field(default_factory=dict)
    model: object = None  # the in-memory model with every quantized linear replaced by its W_hat (CPU)


def default_output(name: str, group_size: int) -> Path:
    return Path(f"{name}-qoq-w4a8kv4-{group_label(group_size)}")


def quantize(opts: QuantizeOptions, reporter: Reporter | None = None) -> QuantizeResult:
    """Quantize a model to a QoQ W4A8KV4 artifact and return where it was written.

    The output is checked and its hidden partial folder created before the model is loaded. Started as
    several torchrun ranks, the ranks share the calibration samples (`calibration.parallel`) and rank 0
    alone checks the output and writes the artifact; the others return a result without a path."""
    from qoq.calibration.data import check_calibration_path

    reporter = reporter or Reporter()
    opts.validate()
    check_calibration_path(opts.calib)
    ranks = join_ranks(resolve_device(opts.device))
    _require_one_process_for_resume(opts, ranks.world)
    if ranks.is_first:
        result = _quantize_to_output(opts, ranks, reporter)
    else:
        result = _quantize_into(None, None, opts, ranks.device, Reporter(), ranks)
    # only after success: a rank that failed exits at once, and the launcher stops the ones still waiting for it
    leave_ranks(ranks)
    return result


def check_before_launch(opts: QuantizeOptions, ranks: int) -> None:
    """What `quantize` on `ranks` processes refuses before loading anything, checked before they start."""
    from qoq.calibration.data import check_calibration_path

    opts.validate()
    _require_one_process_for_resume(opts, ranks)
    if opts.calib_samples is not None:
        DataParallelGroup(world=ranks).sample_range(opts.calib_samples)
    check_calibration_path(opts.calib)
    check_output(output_path(opts), opts.model, opts.overwrite)


def _require_one_process_for_resume(opts: QuantizeOptions, ranks: int) -> None:
    if opts.resume and ranks > 1:
        raise QoqError(f"{arg('resume')} continues a run of one process (data-parallel runs take no resume "
                       "points); run it without the extra GPUs")


def output_path(opts: QuantizeOptions) -> Path:
    from qoq.models.sources import model_name

    return Path(opts.output) if opts.output is not None else default_output(model_name(opts.model), opts.group_size)


def _quantize_to_output(opts: QuantizeOptions, ranks: DataParallelGroup, reporter: Reporter) -> QuantizeResult:
    device = ranks.device
    output = check_output(output_path(opts), opts.model, opts.overwrite)
    remove_stale_partials(output, reporter)
    partial = _partial_for(output, opts.resume, reporter)  # an unwritable output fails now, not after the run
    try:
        return _quantize_into(partial, output, opts, device, reporter, ranks)
    except BaseException as e:
        # an adopted folder outlives any failure: its resume point is the interrupted run's work
        keep = isinstance(e, RESUMABLE_FAILURES) or partial.adopted
        if keep and saved_state(partial.path) is not None:
            drop_owner_record(partial.path)  # this process is leaving it: a later --resume may take it over
            done = saved_state(partial.path)["next_block"]
            reporter.info(f"stopped: {done} finished block{'' if done == 1 else 's'} kept in {partial.path}; "
                          f"run the same command with {arg('resume')} to continue from there")
            e.resume_point = partial.path  # the front end must not say that nothing was kept
        else:
            partial.discard()
        raise


# an interrupted or out-of-memory run keeps its resume point; any other failure would fail again
RESUMABLE_FAILURES = (KeyboardInterrupt, MemoryError, torch.cuda.OutOfMemoryError)  # torch >= 2.4 spells it so


def _partial_for(output: Path, resume: bool, reporter: Reporter) -> PartialFolder:
    """A new partial folder, or with `resume` the one an interrupted run of `output` left."""
    found = resumable_partials(output)
    if resume and found:
        reporter.info(f"resuming from {found[0]} ({saved_state(found[0])['next_block']} blocks done)")
        return adopt_partial(found[0])
    if found:
        raise QoqError(f"{found[0]} holds an interrupted run of {output} "
                       f"({saved_state(found[0])['next_block']} blocks done); continue it with {arg('resume')}, "
                       "or delete that folder to start over")
    if resume:
        reporter.info(f"no interrupted run of {output} to resume; starting from the first block")
    return create_partial(output)


def _quantize_into(partial: PartialFolder | None, output: Path | None, opts: QuantizeOptions, device: torch.device,
                   reporter: Reporter, ranks: DataParallelGroup = SINGLE_PROCESS) -> QuantizeResult:
    from qoq.calibration.data import load_calibration, plan_calibration
    from qoq.models.sources import load_model

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    load_dtype = torch.float32 if device.type == "cpu" else torch.float16
    with reporter.status("loading the model"):
        loaded = load_model(opts.model, dtype=load_dtype, stream=opts.stream)
    plan = plan_calibration(opts.calib, device, opts.calib_samples, opts.calib_seqlen,
                            context=getattr(loaded.model.config, "max_position_embeddings", None))
    if plan.source == "data-free" and loaded.reader is not None:
        reporter.info("data-free calibration samples text from the whole model: loading it in memory")
        with reporter.status("loading the model"):
            loaded = load_model(opts.model, dtype=load_dtype, stream=False)
    if loaded.reader is None:
        require_finite_source(loaded.model)
    else:
        with reporter.status("checking the source tensors"):
            loaded.reader.require_shapes(loaded.model)
            loaded.reader.require_finite()
    n_params = sum(p.numel() for p in loaded.model.parameters())
    how = "streamed block by block from its safetensors" if loaded.reader is not None else "loaded in memory"
    reporter.info(f"model: {loaded.source} ({loaded.architecture}, {n_params/1e6:.0f}M parameters, {how})")
    timings["load_model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reporter.info(plan.message)
    reading = nullcontext() if plan.source == "data-free" else reporter.status("reading calibration text")
    with reading:
        calib = load_calibration(plan.spec, loaded.tokenizer, n_samples=plan.n_samples, seqlen=plan.seqlen,
                                 model=loaded.model, seed=opts.seed, device=device, reporter=reporter)
    reporter.info(f"calibration data: {calib.description}")
    timings["calibration_data_s"] = time.perf_counter() - t0

    fp16_bytes = 2 * n_params  # before rotation unties lm_head
    point, writer, checkpoints = _block_loop_output(partial, opts, loaded, calib, device, ranks)
    _reset_gpu_peak(device)
    t0 = time.perf_counter()
    _, modules, layer_reports = recipe_mod.quantize_decoder_blocks(
        loaded.model, calib.input_ids, opts.group_size, opts.recipe_options(), device, batch_size=opts.batch_size,
        reporter=reporter, compute_dtype=opts.compute_dtype(device), parallel=ranks,
        loop=recipe_mod.BlockLoop(reader=loaded.reader, sink=writer, checkpoints=checkpoints, resume=point))
    timings["quantize_s"] = time.perf_counter() - t0
    if not ranks.is_first:  # rank 0 holds the same tensors and writes them
        return QuantizeResult(path=None, model=loaded.model)

    recipe = opts.recipe(loaded.model.config)
    config = artifact_config(loaded.model, opts.group_size, modules, recipe)
    report = {
        "source": {"model": loaded.source, "reload": loaded.reload_spec, "sha256": loaded.source_sha256,
                   "architecture": loaded.architecture, "streamed": loaded.reader is not None},
        "calibration": {"description": calib.description, "sha256": calib.sha256, **plan.record()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "device": str(device),
        **_data_parallel_record(ranks, calib.input_ids.shape[0]),
        "recipe": recipe,
        "calibration_compute_dtype": str(opts.compute_dtype(device)).removeprefix("torch."),
        "layers": layer_reports,
        "sizes": artifact_sizes(writer, fp16_bytes),
        "timings": timings,
        "memory": memory_record(device),
        "resumed_at_block": point.next_block if point is not None else None,
        "versions": versions(),
    }
    if checkpoints is not None:
        checkpoints.discard()
    t0 = time.perf_counter()
    with reporter.status(f"writing {output}"):
        path = write_artifact(output, config, None, report, tokenizer=loaded.tokenizer, overwrite=opts.overwrite,
                              partial=partial, shards=writer)
    timings["write_s"] = time.perf_counter() - t0  # after the report was written: in the result only
    report["memory"] = memory_record(device)
    remember_last_artifact(path)
    model = loaded.model if loaded.reader is None else None
    return QuantizeResult(path=path, report=report, model=model)


class _Discarded:
    """The tensors of a rank > 0: rank 0 holds the same ones and writes them."""

    def add(self, tensors: dict) -> None:
        pass

    def make_room(self, size: int) -> None:
        pass


def _block_loop_output(partial: PartialFolder | None, opts: QuantizeOptions, loaded, calib, device: torch.device,
                       ranks: DataParallelGroup):
    """(resume point or None, shard writer, resume points) for the block loop; nothing on ranks > 0, which
    write nothing, and no resume points under data parallelism (each rank holds only its own hidden states)."""
    if partial is None:
        return None, _Discarded(), None
    fingerprint = resume_fingerprint(opts, loaded, calib, device)
    if opts.resume and saved_state(partial.path) is not None:
        point = load_resume_point(partial.path, fingerprint, SHARD_BYTES)
        writer = point.writer
    else:
        point, writer = None, ShardWriter(partial.path, SHARD_BYTES, stage_units=ranks.world == 1)
    checkpoints = Checkpoints(partial.path, writer, fingerprint, checkpoint_seconds()) if ranks.world == 1 else None
    return point, writer, checkpoints


def resume_fingerprint(opts: QuantizeOptions, loaded, calib, device: torch.device) -> dict:
    """Everything that decides the artifact's bytes: a resumed run must match it exactly."""
    from qoq.version import __version__

    decisive = {k: v for k, v in asdict(opts).items() if k not in ("output", "overwrite", "resume", "stream", "model")}
    return {"model": loaded.source_sha256, "calibration data": calib.sha256, "device": device.type,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in decisive.items()},
            "qoq version": __version__}


def checkpoint_seconds() -> float:
    """How often a resume point is taken ($QOQ_CHECKPOINT_SECONDS; 0 = after every block)."""
    raw = os.environ.get("QOQ_CHECKPOINT_SECONDS")
    try:
        return max(0.0, float(raw)) if raw else CHECKPOINT_SECONDS
    except ValueError:
        raise QoqError(f"QOQ_CHECKPOINT_SECONDS={raw!r} is not a number of seconds") from None


def memory_record(device: torch.device) -> dict:
    """Peak host RSS and (on CUDA) peak GPU memory allocated by this process so far."""
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_host_rss_bytes": peak_host_memory_bytes(), "peak_gpu_bytes": gpu}


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _data_parallel_record(ranks: DataParallelGroup, n_samples: int) -> dict:
    """How the calibration samples were shared (nothing for one process)."""
    if ranks.world == 1:
        return {}
    shares = [DataParallelGroup(rank=r, world=ranks.world).sample_range(n_samples) for r in range(ranks.world)]
    return {"data_parallel": {"ranks": ranks.world, "samples_per_rank": [end - start for start, end in shares]}}


def artifact_config(model, group_size: int, modules: dict, recipe: dict) -> dict:
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "torch_dtype", "dtype"):
        config.pop(key, None)
    config["torch_dtype"] = "float16"
    config["quantization_config"] = quantization_config(group_size, modules, recipe)
    return config


def artifact_sizes(writer: ShardWriter, fp16_bytes: int) -> dict:
    stored = writer.total_bytes()
    return {"fp16_bytes": fp16_bytes, "artifact_bytes": stored, "compression": fp16_bytes / stored}


def versions() -> dict:
    import transformers

    from qoq.version import __version__
    return {"qoq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def peak_host_memory_bytes() -> int | None:
    """Peak resident memory of this process so far (None where the platform cannot say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
