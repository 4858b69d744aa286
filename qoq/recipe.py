"""The QoQ recipe, one decoder block at a time: capture -> reorder -> smooth -> SmoothAttention -> GPTQ/RTN.

Order follows the authors' library (rotate -> reorder -> smooth -> quantize weights). Rotation is
data-free and done per block just before the block is processed (`rotate_layer`), the embedding
before the first block and lm_head after the last (`quantize_decoder_blocks`). Per block:

1. pass A: the (rotated, FP) block runs over its cached calibration inputs while hooks collect the
   post-RoPE q/k channel maxima (SmoothAttention), the down_proj input channel maxima and a strided
   sample of its rows (reordering, smoothing), post-RoPE q/k/v of a few samples (SmoothAttention
   search), and the input Hessians of q/k/v, o_proj, gate/up and down_proj (GPTQ, clip search);
2. reorder down_proj inputs (per-group only), smooth them with the searched alpha, fuse
   SmoothAttention (fixed alpha or searched (alpha, beta)); the down_proj Hessian is transformed
   exactly (permuted and rescaled) instead of being measured again;
3. quantize the seven linears (GPTQ with s1 fixed, or RTN; per-channel with clip search) and put
   each W_hat into the block;
4. pass B: the quantized block's outputs become the next block's inputs ("quantized" propagation;
   "fp" keeps the FP outputs of pass A, as plain RTN does).

Under data-parallel calibration (`calibration.parallel`) each rank runs both passes over its own slice
of the samples; what pass A collected is reduced across the ranks before step 2, so the steps after it
see the statistics of the whole calibration set and every rank quantizes identically.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from qoq.algorithm.clip import DEFAULT_RATIOS, quantize_per_channel, search_clip_ratios
from qoq.algorithm.gptq import BLOCK as GPTQ_BLOCK, DAMP as GPTQ_DAMP, HessianAccumulator, gptq_quantize_many
from qoq.scheme.progressive import QuantizedWeight, dequantize, quantize_weight
from qoq.algorithm.reorder import apply_down_reorder, channel_order, permute_hessian
from qoq.algorithm.rotation import (rotate_embedding, rotate_layer, rotate_lm_head, rotation_matrices, rotation_record,
                                    untie_lm_head)
from qoq.algorithm.smooth_attention import (fuse_smooth_attention, search_smooth_attention, smooth_attention_grid,
                                            smooth_attention_scales)
from qoq.algorithm.smooth_linear import DEFAULT_ALPHAS, apply_down_smoothing, search_down_smoothing
from qoq.calibration.parallel import SINGLE_PROCESS, DataParallelGroup
from qoq.checks import require_finite_activations
from qoq.models.arch import block_linears, decoder_layers, head_dims
from qoq.scheme.ops import apply_rope

RECIPES = ("qoq", "rtn")
ERROR_SAMPLES = 4  # calibration samples used to measure each block's output error
# linears that read the same input share one Hessian (and one GPTQ pass)
HESSIAN_GROUPS = (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("o", ("self_attn.o_proj",)), ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
                  ("down", ("mlp.down_proj",)))


@dataclass
class RecipeOptions:
    """Which steps run. `preset("qoq")` is the full recipe, `preset("rtn")` progressive RTN + SmoothAttention."""

    name: str = "qoq"
    rotation: bool = True  # residual Hadamard (norms folded) + per-head Hadamard on V
    smooth_linear: bool = True  # down_proj input smoothing, alpha searched
    reorder: bool = True  # down_proj input channel reordering (per-group only)
    gptq: bool = True
    clip_search: bool = True  # per-channel only
    smooth_attn_alpha: float = 0.5  # fixed alpha (beta 0) when the search is off; 0 turns SmoothAttention off
    smooth_attn_search: bool = True  # (alpha, beta) grid search on the attention output error
    propagate: str = "quantized"  # next block's inputs: "quantized" block outputs or "fp" outputs
    search_rows: int = 1024  # down_proj input rows (strided over the calibration set) for the alpha search
    attn_search_samples: int = 4  # calibration samples for the SmoothAttention search ...
    attn_search_tokens: int = 512  # ... their first tokens ...
    attn_search_query_stride: int = 4  # ... and every 4th query position (attending to all its keys)

    @classmethod
    def preset(cls, name: str, **overrides) -> "RecipeOptions":
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
        base = cls(name=name) if name == "qoq" else cls(
            name="rtn", rotation=False, smooth_linear=False, reorder=False, gptq=False, clip_search=False,
            smooth_attn_search=False, propagate="fp")
        for k, v in overrides.items():
            if v is not None:
                setattr(base, k, v)
        return base

    def record(self, config, group_size: int) -> dict:
        """What the artifact's quantization_config["recipe"] says was done."""
        sa_on = self.smooth_attn_search or self.smooth_attn_alpha > 0
        return {
            "name": self.name,
            "rotation": rotation_record(config) if self.rotation else False,
            "reorder": bool(self.reorder and group_size > 0),
            "smooth_linear": {"modules": ["mlp.down_proj"], "alpha_grid": list(DEFAULT_ALPHAS),
                              "beta": "1 - alpha"} if self.smooth_linear else False,
            "smooth_attention": ({"search": True, "grid": [list(p) for p in smooth_attention_grid()]}
                                 if self.smooth_attn_search else
                                 {"search": False, "alpha": self.smooth_attn_alpha, "beta": 0.0}) if sa_on else False,
            "weights": "gptq" if self.gptq else "rtn",
            "gptq": {"damp": GPTQ_DAMP, "block": GPTQ_BLOCK, "level": "uint4 (s1 fixed)"} if self.gptq else False,
            "clip_search": ({"ratios": [min(DEFAULT_RATIOS), max(DEFAULT_RATIOS)], "grid": len(DEFAULT_RATIOS)}
                            if self.clip_search and group_size == -1 else False),
            "propagation": self.propagate,
        }


@dataclass
class BlockResult:
    weights: dict[str, QuantizedWeight]
    next_inputs: torch.Tensor
    report: dict = field(default_factory=dict)


@torch.no_grad()
def quantize_block(layer, runner, ropts: RecipeOptions, group_size: int, rotation=None,
                   compute_dtype: torch.dtype = torch.float32, index: int = 0) -> BlockResult:
    """Transform and quantize one block (already on the device, fp32) over `runner`'s cached inputs.

    `compute_dtype` bfloat16 runs the two calibration passes under autocast (the CPU default: its
    matmuls are 2-3x faster); the weights, the transforms and GPTQ stay in fp32/fp64."""
    config = runner.model.config
    heads, kv_heads, head_dim = head_dims(config)
    report: dict = {}
    t0 = time.perf_counter()
    if rotation is not None:
        rotate_layer(layer, rotation[0], rotation[1], config)
    linears = block_linears(layer)
    per_group = group_size > 0
    do_reorder = ropts.reorder and per_group
    do_clip = ropts.clip_search and not per_group

    cap = _Capture(runner, hessians=ropts.gptq or do_clip, down_stats=do_reorder or ropts.smooth_linear,
                   search_rows=ropts.search_rows if ropts.smooth_linear else 0,
                   attn_samples=ropts.attn_search_samples if ropts.smooth_attn_search else 0,
                   attn_tokens=ropts.attn_search_tokens)
    with cap.hooks(layer), _autocast(runner.device, compute_dtype):
        fp_out, stats = runner.forward_with_stats(layer)
    # NaN/Inf here would reach GPTQ as a non-positive-definite Hessian: stop with the block's name instead
    # (before the ranks combine, so the rank whose slice overflowed says so, not another rank's GPTQ)
    require_finite_activations(index, "the calibration outputs before quantization", fp_out)
    cap.combine_ranks()
    t_capture = time.perf_counter()

    gate, up, down = linears["mlp.gate_proj"], linears["mlp.up_proj"], linears["mlp.down_proj"]
    h_down = cap.hessian("down")
    if do_reorder:
        perm = channel_order(cap.down_absmax)
        apply_down_reorder(gate, up, down, perm)
        cap.down_absmax = cap.down_absmax[perm.to(cap.down_absmax.device)]
        if cap.down_rows is not None:
            cap.down_rows = cap.down_rows[:, perm.to(cap.down_rows.device)]
        if h_down is not None:
            h_down = permute_hessian(h_down, perm)
    if ropts.smooth_linear:
        choice = search_down_smoothing(cap.down_rows.to(down.weight.device), down.weight,
                                       cap.down_absmax.to(down.weight.device), group_size)
        report["smooth_alpha"] = choice.alpha
        if choice.alpha is not None:
            apply_down_smoothing(up, down, choice.scales)
            if h_down is not None:
                inv = 1.0 / choice.scales.double().to(h_down.device)
                h_down = h_down * inv[:, None] * inv[None, :]

    q_proj, k_proj = linears["self_attn.q_proj"], linears["self_attn.k_proj"]
    if ropts.smooth_attn_search:
        q, k, v = cap.attention_samples()
        alpha, beta, lam, _errors = search_smooth_attention(q, k, v, heads, kv_heads, stats.query_absmax.to(q.device),
                                                            stats.key_absmax.to(q.device),
                                                            query_stride=ropts.attn_search_query_stride)
        report["smooth_attn"] = [alpha, beta]
        if (alpha, beta) != (0.0, 0.0):
            fuse_smooth_attention(q_proj, k_proj, lam, heads, kv_heads)
    elif ropts.smooth_attn_alpha > 0:
        lam = smooth_attention_scales(stats.key_absmax, ropts.smooth_attn_alpha, head_dim)
        fuse_smooth_attention(q_proj, k_proj, lam, heads, kv_heads)
        report["smooth_attn"] = [ropts.smooth_attn_alpha, 0.0]
    t_transform = time.perf_counter()

    weights, weight_errors = {}, {}
    for key, names in HESSIAN_GROUPS:
        h = h_down if key == "down" else cap.hessian(key)
        ws = [linears[n].weight for n in names]
        ratios = [search_clip_ratios(w, h) for w in ws] if do_clip else [None] * len(ws)
        if ropts.gptq:
            qws = gptq_quantize_many(ws, h, group_size, clip_ratios=ratios)
        else:
            qws = [quantize_weight(w, group_size) if r is None else quantize_per_channel(w, r)
                   for w, r in zip(ws, ratios, strict=True)]
        for name, qw in zip(names, qws, strict=True):
            linear = linears[name]
            w_hat = dequantize(qw).to(linear.weight.dtype)
            weight_errors[name] = float((w_hat - linear.weight).norm() / linear.weight.norm().clamp_min(1e-12))
            linear.weight.data.copy_(w_hat)
            weights[name] = qw
    weights = {name: weights[name] for name in linears}
    runner.parallel.align_to_first(layer)  # before pass B: every rank propagates through the same weights
    cap.release()
    t_quant = time.perf_counter()

    with _autocast(runner.device, compute_dtype):
        if ropts.propagate == "quantized":
            q_out = runner.forward(layer)
            next_inputs = q_out
        else:
            q_out = runner.forward(layer, limit=ERROR_SAMPLES)
            next_inputs = fp_out
    require_finite_activations(index, "the quantized block's outputs", q_out)
    n = min(ERROR_SAMPLES, fp_out.shape[0])
    report["block_output_rel_error"] = _relative_error(q_out[:n], fp_out[:n])
    report["weight_rel_error"] = weight_errors
    report["step_seconds"] = {"capture": t_capture - t0, "transform": t_transform - t_capture,
                              "quantize": t_quant - t_transform, "propagate": time.perf_counter() - t_quant}
    return BlockResult(weights=weights, next_inputs=next_inputs, report=report)


class _Capture:
    """Forward hooks on one block collecting what the recipe's steps need, batch by batch.

    Sample and token positions are global (the runner's slice starts at `runner.sample_offset`), so the
    strided row sample and the first `attn_samples` samples, gathered in rank order by `combine_ranks`,
    are exactly those one process would have taken."""

    def __init__(self, runner, hessians: bool, down_stats: bool, search_rows: int, attn_samples: int,
                 attn_tokens: int):
        self.runner = runner
        self.want_hessians = hessians
        self.want_down = down_stats
        n, t = runner.total_samples, runner.hidden.shape[1]
        self.row_stride = max(1, math.ceil(n * t / search_rows)) if search_rows > 0 else 0
        self.attn_samples = attn_samples
        # this rank's share of the first `attn_samples` samples
        self.attn_quota = min(max(attn_samples - runner.sample_offset, 0), runner.hidden.shape[0])
        self.attn_tokens = min(attn_tokens, t)
        self.acc: dict[str, HessianAccumulator] = {}
        self.down_absmax = None
        self.down_rows = None
        self._rows: list[torch.Tensor] = []
        self._offset = runner.sample_offset * t  # running global token index, for the strided row sample
        self._attn: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": []}
        self._attn_seen = {"q": 0, "k": 0, "v": 0}

    @contextmanager
    def hooks(self, layer):
        handles = []
        mods = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj",
                "down": "mlp.down_proj"}
        if self.want_hessians:
            for key, name in mods.items():
                if key != "down":
                    handles.append(layer.get_submodule(name).register_forward_pre_hook(self._hessian_hook(key)))
        if self.want_hessians or self.want_down:
            handles.append(layer.get_submodule(mods["down"]).register_forward_pre_hook(self._down_hook))
        if self.attn_samples > 0:
            for key in ("q", "k", "v"):
                handles.append(layer.get_submodule(f"self_attn.{key}_proj").register_forward_hook(self._attn_hook(key)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            if self._rows:
                self.down_rows = torch.cat(self._rows)
                self._rows = []

    def combine_ranks(self) -> None:
        """Reduce what every rank collected: Hessian sums and row counts added, channel maxima maxed, the
        row and attention samples gathered in rank order (nothing changes for one process)."""
        parallel = self.runner.parallel
        if parallel.world == 1:
            return
        for key in sorted(self.acc):  # the same order of collectives on every rank
            acc = self.acc[key]
            acc.h, acc.n = parallel.sum(acc.h), parallel.sum_count(acc.n)
        if self.down_absmax is not None:
            self.down_absmax = parallel.max(self.down_absmax)
        if self.down_rows is not None:
            self.down_rows = parallel.gather_rows(self.down_rows)
        for key in ("q", "k", "v") if self.attn_samples > 0 else ():
            self._attn[key] = [parallel.gather_rows(torch.cat(self._attn[key]))]

    def hessian(self, key: str):
        acc = self.acc.get(key)
        return None if acc is None else acc.hessian

    def release(self) -> None:
        self.acc.clear()
        self._attn = {"q": [], "k": [], "v": []}

    def attention_samples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.cat(self._attn[key]) for key in ("q", "k", "v"))

    def _add(self, key: str, x: torch.Tensor) -> None:
        if key not in self.acc:
            self.acc[key] = HessianAccumulator(x.shape[-1], device=x.device)
        self.acc[key].add(x)

    def _hessian_hook(self, key):
        def fn(_module, args):
            self._add(key, args[0])
        return fn

    def _down_hook(self, _module, args):
        x = args[0]
        if self.want_hessians:
            self._add("down", x)
        if self.want_down:
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            self.down_absmax = m if self.down_absmax is None else torch.maximum(self.down_absmax, m)
        if self.row_stride:
            flat = x.reshape(-1, x.shape[-1])
            first = (-self._offset) % self.row_stride
            self._rows.append(flat[first::self.row_stride].float().clone())
            self._offset += flat.shape[0]

    def _attn_hook(self, key):
        def fn(_module, _args, output):
            seen = self._attn_seen[key]
            if seen >= self.attn_quota and self._attn[key]:
                return
            # a rank past the first samples keeps one empty [0, heads, tokens, d] piece for the gather
            b = min(output.shape[0], self.attn_quota - seen)
            self._attn_seen[key] = seen + b
            t = self.attn_tokens
            d = self.runner.head_dim
            x = output[:b, :t].float().view(b, t, output.shape[-1] // d, d).transpose(1, 2)
            if key in ("q", "k"):
                x = apply_rope(x, self.runner.cos[:, :t], self.runner.sin[:, :t])
            self._attn[key].append(x.contiguous())
        return fn


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 autocast for the calibration passes on CPUs with native bf16 matmuls, else fp32."""
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@dataclass
class BlockLoop:
    """Where the block loop's weights come from and where its tensors go.

    `reader`: the checkpoint to stream each module from (None: the model holds its weights);
    `sink`: receives the artifact's tensors unit by unit (`add`; `make_room` before a big unit is read),
    e.g. a `ShardWriter`;
    `checkpoints`: saves a resume point after a block (`after_block`); `resume`: the point to start from."""

    reader: object = None
    sink: object = None
    checkpoints: object = None
    resume: object = None


class _TensorDict:
    """The sink when none is given: every unit's tensors in one dict, in order."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors.update(tensors)

    def make_room(self, size: int) -> None:
        pass


@torch.no_grad()
def quantize_decoder_blocks(model, input_ids: torch.Tensor, group_size: int, ropts: RecipeOptions,
                            device: torch.device, batch_size: int = 4, reporter=None,
                            compute_dtype: torch.dtype = torch.float32,
                            loop: BlockLoop | None = None,
                            parallel: DataParallelGroup = SINGLE_PROCESS) -> tuple[dict, dict, list]:
    """Every block through `quantize_block`; returns (artifact tensors, {linear: (N, K)}, per-layer reports).

    The tensors go to `loop.sink` as they are made (then the returned dict is empty) in the artifact's
    order: the embedding, each block, the final norm and lm_head. The embedding is rotated (and written)
    first, lm_head last, so with `loop.reader` only one of them is in memory at a time.
    `parallel`: the data-parallel ranks sharing `input_ids` (every rank returns the same tensors)."""
    from qoq.calibration.blocks import BlockRunner
    from qoq.formats.artifact import quantized_tensors

    loop = loop or BlockLoop()
    sink = loop.sink if loop.sink is not None else _TensorDict()
    track = reporter.track if reporter is not None else (lambda items, _desc: items)
    rotation = rotation_matrices(model.config, per_head=True) if ropts.rotation else None
    modules = {f"model.layers.{i}.{name}": tuple(linear.weight.shape)
               for i, layer in enumerate(decoder_layers(model)) for name, linear in block_linears(layer).items()}
    tied_source = bool(model.config.tie_word_embeddings)  # before rotation unties lm_head
    resume = loop.resume
    if resume is None:
        embed = _loaded(loop.reader, model.get_input_embeddings(), "model.embed_tokens")
        if rotation is not None:
            untie_lm_head(model)
            rotate_embedding(embed, rotation[0], device)
        sink.add({"model.embed_tokens.weight": embed.weight.detach().half().cpu()})
        runner = BlockRunner(model, input_ids, device, batch_size=batch_size, parallel=parallel)
        _release(loop.reader, embed)
        start, layer_reports = 0, []
    else:
        if rotation is not None:
            untie_lm_head(model)
        runner = BlockRunner(model, input_ids, device, batch_size=batch_size, parallel=parallel,
                             hidden=resume.hidden)
        start, layer_reports = resume.next_block, list(resume.layer_reports)
    if reporter is not None:
        reporter.info(runner.store.describe())
    layers = list(runner.layers)
    for i in track(range(start, len(layers)), "quantizing blocks"):
        started = time.perf_counter()
        layer = _loaded(loop.reader, layers[i], f"model.layers.{i}")
        layer.to(device=device, dtype=torch.float32)
        result = quantize_block(layer, runner, ropts, group_size, rotation, compute_dtype, index=i)
        prefix = f"model.layers.{i}"
        unit = {}
        for name, qw in result.weights.items():
            unit.update(quantized_tensors(f"{prefix}.{name}", _to_cpu(qw), layer.get_submodule(name).bias))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            unit[f"{prefix}.{norm}.weight"] = layer.get_submodule(norm).weight.detach().half().cpu()
        sink.add(unit)
        layer_reports.append({"layer": i, **result.report, "seconds": time.perf_counter() - started})
        runner.advance(result.next_inputs)
        if loop.reader is not None:
            _release(loop.reader, layer)
        else:
            layer.to("cpu")
        if loop.checkpoints is not None:
            loop.checkpoints.after_block(i + 1, runner.hidden, layer_reports)
    sink.make_room(_final_bytes(model))
    sink.add(_final_tensors(model, loop.reader, rotation, device, tied_source))
    tensors = sink.tensors if isinstance(sink, _TensorDict) else {}
    return tensors, modules, layer_reports


def _final_tensors(model, reader, rotation, device: torch.device, tied_source: bool) -> dict[str, torch.Tensor]:
    """The final norm and (unless still tied) lm_head, the norm folded into lm_head when rotating."""
    norm = _loaded(reader, model.model.norm, "model.norm")
    head = None
    if not model.config.tie_word_embeddings:
        # a tied source's lm_head is its embedding, whatever else the checkpoint stores
        stored = "model.embed_tokens" if tied_source else "lm_head"
        head = _loaded(reader, model.get_output_embeddings(), stored)
        if rotation is not None:
            rotate_lm_head(head, norm, rotation[0], device)
    tensors = {"model.norm.weight": norm.weight.detach().half().cpu()}
    if head is not None:
        tensors["lm_head.weight"] = head.weight.detach().half().cpu()
        _release(reader, head)
    _release(reader, norm)
    return tensors


def _final_bytes(model) -> int:
    """What `_final_tensors` will give, in bytes (fp16), known from the shapes before anything is read."""
    shapes = [model.model.norm.weight.shape]
    if not model.config.tie_word_embeddings:
        shapes.append(model.get_output_embeddings().weight.shape)
    return sum(2 * math.prod(s) for s in shapes)


def _loaded(reader, module, prefix: str):
    return module if reader is None else reader.load(module, prefix)


def _release(reader, module) -> None:
    if reader is not None:
        reader.release(module)


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    for name in ("q", "s1", "s2", "z", "szeros"):
        t = getattr(qw, name, None)
        if isinstance(t, torch.Tensor):
            setattr(qw, name, t.cpu())
    return qw
