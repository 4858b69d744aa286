"""Block-by-block calibration: one decoder block on the device at a time, its inputs cached.

Peak device memory is one block in fp32 plus the cached hidden states of the calibration set (of this
rank's share of it under data-parallel calibration, `calibration.parallel`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qoq.calibration.parallel import SINGLE_PROCESS, DataParallelGroup
from qoq.errors import QoqError
from qoq.models.arch import decoder_layers, head_dims, rotary_cos_sin
from qoq.scheme.ops import apply_rope


# what else a block needs on the GPU besides three copies of the hidden states (inputs, FP and
# quantized outputs): the fp32 block, its Hessians and the activations of one batch
_GPU_HEADROOM = 8 << 30


@dataclass
class HiddenStore:
    """Where the calibration hidden states live: on the GPU when they fit, else in pinned host memory."""

    device: torch.device
    pinned: bool = False
    bytes_per_copy: int = 0

    def describe(self) -> str:
        size = f"{self.bytes_per_copy / 2**30:.2f} GiB per copy"
        if self.device.type == "cuda":
            return f"calibration hidden states on the GPU ({size})"
        return f"calibration hidden states in {'pinned ' if self.pinned else ''}host memory ({size})"


def hidden_store(device: torch.device, nbytes: int) -> HiddenStore:
    """GPU when three copies plus headroom fit its free memory, else pinned host memory (CPU runs: host)."""
    if device.type != "cuda":
        return HiddenStore(torch.device("cpu"), False, nbytes)
    free, _total = torch.cuda.mem_get_info(device)
    if 3 * nbytes + _GPU_HEADROOM <= free:
        return HiddenStore(device, False, nbytes)
    return HiddenStore(torch.device("cpu"), True, nbytes)


@dataclass
class BlockStats:
    """Per-channel max |.| of post-RoPE queries and keys over the calibration tokens."""

    query_absmax: torch.Tensor  # [H*D]
    key_absmax: torch.Tensor  # [Hkv*D]


class BlockRunner:
    """Runs the decoder blocks of `model` on `device` over cached calibration hidden states.

    Under data-parallel calibration the runner holds only its rank's contiguous slice of the samples,
    rank 0's `input_ids` taken on every rank (so all ranks share one calibration set by construction);
    `sample_offset` is the slice's first global sample and `total_samples` the whole set's size.
    `hidden`: this rank's cached inputs to start from (a resumed run, an iterable of row chunks), else the
    embeddings of its samples."""

    def __init__(self, model, input_ids: torch.Tensor, device: torch.device, batch_size: int = 4,
                 parallel: DataParallelGroup = SINGLE_PROCESS, hidden=None):
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.parallel = parallel
        input_ids = parallel.from_first(_same_shape_as_first(input_ids, parallel))
        self.total_samples = input_ids.shape[0]
        self.sample_offset, end = parallel.sample_range(self.total_samples)
        input_ids = input_ids[self.sample_offset:end]
        self.heads, self.kv_heads, self.head_dim = head_dims(model.config)
        self.cos, self.sin = rotary_cos_sin(model, input_ids.shape[1], device)
        n, t = input_ids.shape
        self.store = hidden_store(device, n * t * model.config.hidden_size * 4)
        if hidden is not None:  # chunks, each moved to the store as it is read
            self.hidden = self._stored(hidden, n)
            return
        embed = model.get_input_embeddings()
        with torch.no_grad():  # a generator: the embedding lives on the host, one batch at a time goes to the store
            self.hidden = self._stored((embed(ids.to(embed.weight.device)).float()
                                        for ids in input_ids.split(batch_size)), n)

    @property
    def layers(self):
        return decoder_layers(self.model)

    @torch.no_grad()
    def forward(self, layer, limit: int | None = None) -> torch.Tensor:
        """The block's outputs for the cached inputs, optionally the first `limit` samples."""
        hidden = self.hidden
        if limit is not None:
            hidden = hidden[:limit]
        return self._stored((self._call(layer, x.to(self.device)) for x in hidden.split(self.batch_size)),
                            hidden.shape[0])

    @torch.no_grad()
    def forward_with_stats(self, layer) -> tuple[torch.Tensor, BlockStats]:
        """Outputs for the cached inputs, and max |post-RoPE q/k| per channel (over all ranks), in one pass."""
        absmax = {}
        with _capture_rope_absmax(layer, self.cos, self.sin, self.head_dim, absmax):
            out = self.forward(layer)
        return out, BlockStats(query_absmax=self.parallel.max(absmax["self_attn.q_proj"]),
                               key_absmax=self.parallel.max(absmax["self_attn.k_proj"]))

    def advance(self, outputs: torch.Tensor) -> None:
        """The next block's inputs are this block's outputs."""
        self.hidden = outputs

    def _stored(self, batches, rows: int) -> torch.Tensor:
        """The batches (any iterable; `rows` samples in all) copied one by one into one tensor where the hidden
        states live (GPU, pinned or plain host memory): never a list of them plus their concatenation, and an
        iterable that computes or reads them holds one batch at a time."""
        out, row = None, 0
        for b in batches:
            if out is None:
                out = torch.empty((rows, *b.shape[1:]), dtype=b.dtype, device=self.store.device,
                                  pin_memory=self.store.pinned)
            out[row:row + b.shape[0]].copy_(b)
            row += b.shape[0]
        if out is None or row != rows:
            raise ValueError(f"expected {rows} calibration samples, got {row}")
        return out

    def _call(self, layer, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        positions = torch.arange(t, device=self.device)[None]
        out = layer(x, attention_mask=None, position_ids=positions,
                    position_embeddings=(self.cos[:, :t], self.sin[:, :t]))
        return out[0] if isinstance(out, tuple) else out


def _same_shape_as_first(input_ids: torch.Tensor, parallel: DataParallelGroup) -> torch.Tensor:
    first = parallel.first_shape(input_ids)
    if first != tuple(input_ids.shape):
        raise QoqError(f"rank {parallel.rank} built {'x'.join(map(str, input_ids.shape))} calibration tokens, rank 0 "
                       f"{'x'.join(map(str, first))}; give every rank the same --calib, --calib-samples and "
                       "--calib-seqlen")
    return input_ids


@contextmanager
def _capture_rope_absmax(layer, cos, sin, head_dim, absmax: dict):
    def hook(name):
        def fn(_module, _inputs, output):
            b, t, _ = output.shape
            x = apply_rope(output.float().view(b, t, -1, head_dim).transpose(1, 2), cos[:, :t], sin[:, :t])
            m = x.abs().amax(dim=(0, 2)).flatten()
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
        return fn
    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in ("self_attn.q_proj", "self_attn.k_proj")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
