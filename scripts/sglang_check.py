"""End-to-end check of `qoq export --format sglang` on a synthetic Llama-3-8B-shape model.

For group-128 and per-channel weights: build the RTN-quantized synthetic artifact (random weights), write
it to disk, export it for sglang, read the export back as sglang's `qoq` method reads it (config.json's
quantization_config; tensor names, dtypes and shapes as its loader allocates them from the config) and
compare every tensor byte for byte with the artifact. Then run the *exported* tensors through our engine
with sglang's semantics (qoq.runtime.sglang_semantics: FP16 KV cache, per-channel zero point applied to
the sum of the unquantized activations) and compare the logits of a fixed random prompt batch with our
default semantics on the artifact:

- prefill of fresh prompts: both attend over the prompt's FP16 K/V, so group 128 must agree to float
  noise and per-channel differs by the activation-sum convention only;
- greedy decode steps (the same tokens for both): ours attends over the KV4 cache, sglang's over an FP16
  cache (modelled by a fresh prefill of prompt + tokens so far), so they differ by the KV convention.

Exits 1 when a check fails (export config, names, shapes or bytes; group-128 prefill relative difference
above 1e-3; per-channel above 5e-2), 2 on bad input. On CUDA it uses the cupy backend, on CPU the
reference one (`--shape tiny` runs in seconds there).

    python3 scripts/sglang_check.py [--layers N] [--out DIR] [--shape llama-3-8b|tiny]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from qoq.bench import synthetic
from qoq.errors import QoqError
from qoq.formats.artifact import INDEX_FILE, WEIGHTS_FILE, Artifact, quantization_config, read_artifact, write_artifact
from qoq.formats.export_sglang import export_sglang
from qoq.runtime.backend import get_backend, resolve_device
from qoq.runtime.engine import Engine
from qoq.runtime.sglang_semantics import sglang_backend

FORMATS = {"g128": 128, "per-channel": -1}
MAX_REL = 1e-3  # float noise: the same integers, at most a different summation order
NOTES = {
    "prefill_same_semantics": "exported tensors, our semantics, against the artifact: checked <= max_rel",
    "prefill": "exported tensors, sglang semantics, fresh prompts (FP16 K/V in both): checked <= max_rel for "
               "group 128; per-channel differs by sglang's sum over the unquantized activations (reported)",
    "decode": "greedy steps on the same tokens: sglang's FP16 KV cache against our KV4 cache (reported)",
    "rel": "relative Frobenius difference of the logits; top1: share of positions with the same argmax",
}
SGLANG_GROUP = 128  # s2_scales / s2_zeros rows: sglang allocates K / 128 of them
# sglang's shapes on a CPU budget: every width a multiple of 128 (K) and of 32 per part, q|k|v = 256
TINY_SHAPE = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512, rope_theta=500000.0,
                  max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0,
                  eos_token_id=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3-8b", help="a qoq bench shape, or 'tiny' (a CPU smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="only the first N blocks (default: all)")
    ap.add_argument("--out", type=Path, default=Path("sglang-check-out"), help="folder for sglang_check.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--device", default="auto", help="auto, cuda or cpu")
    ap.add_argument("--backend", default="auto", help="auto (cupy on CUDA), cupy or reference")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


@contextmanager
def registered_shape(shape: str, layers: int | None):
    """The name under which `build_synthetic_artifact` finds `shape` cut to `layers` blocks (registered
    for the duration only, so an importing process keeps the published table)."""
    base = TINY_SHAPE if shape == "tiny" else dict(synthetic.shape_config(shape))
    total = base["num_hidden_layers"]
    if layers is not None and not 1 <= layers <= total:
        raise QoqError(f"--layers {layers} must be between 1 and {total} (the blocks of {shape})")
    name = f"sglang-check:{shape}:{layers or total}"
    synthetic.SHAPES[name] = {**base, "num_hidden_layers": layers or total}
    try:
        yield name
    finally:
        synthetic.SHAPES.pop(name, None)


def write_synthetic_artifact(shape_name: str, group: int, device: torch.device, seed: int, folder: Path) -> Path:
    """The synthetic artifact, quantized on `device`, written as a real artifact folder."""
    art = synthetic.build_synthetic_artifact(shape_name, device, group_size=group, seed=seed)
    tensors = {name: t.cpu() for name, t in art.tensors.items()}
    return write_artifact(folder / "artifact", art.config, tensors, art.report)


def read_export(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor of the exported checkpoint, from the files sglang would open."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    index = folder / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_FILE]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(folder / file))
    return config, tensors


def sglang_allocations(config: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What sglang's model allocates for the checkpoint's tensors, computed from its config.json alone
    (per q/k/v/gate/up part: its shard of the fused parameter)."""
    dims = synthetic.ModelDims.from_config(config)
    group = config["quantization_config"]["group_size"]
    fp16, int8 = torch.float16, torch.int8
    out = {"model.embed_tokens.weight": (fp16, (dims.vocab, dims.hidden)), "model.norm.weight": (fp16, (dims.hidden,))}
    if not dims.tied:
        out["lm_head.weight"] = (fp16, (dims.vocab, dims.hidden))
    for i in range(dims.layers):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}.{norm}.weight"] = (fp16, (dims.hidden,))
        for lname, (n, k) in dims.linear_shapes().items():
            name = f"{p}.{lname}"
            out[f"{name}.qweight"] = (int8, (n, k // 2))
            out[f"{name}.s1_scales"] = (fp16, (n,))
            if group == -1:
                out[f"{name}.s1_szeros"] = (fp16, (n,))
            else:
                out[f"{name}.s2_scales"] = out[f"{name}.s2_zeros"] = (int8, (k // SGLANG_GROUP, n))
    return out


def config_problems(art: Artifact, config: dict) -> list[str]:
    """The export's config.json must be the artifact's plus what sglang's QoQConfig.from_config reads."""
    problems = []
    want_q = {"quant_method": "qoq", "wbits": 4, "group_size": art.group_size}
    if config.get("quantization_config") != want_q:
        problems.append(f"quantization_config is {config.get('quantization_config')}, sglang reads {want_q}")
    if config.get("torch_dtype") != "float16":
        problems.append(f"torch_dtype is {config.get('torch_dtype')!r}, sglang's qoq kernels take float16")
    rest = {k for k in set(config) | set(art.config) if k not in ("quantization_config", "torch_dtype")}
    changed = sorted(k for k in rest if config.get(k) != art.config.get(k))
    if changed:
        problems.append(f"config keys differ from the artifact's: {', '.join(changed)}")
    return problems


def tensor_problems(art: Artifact, config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names as sglang expects them, dtypes and shapes as it allocates them, bytes as the artifact holds them."""
    problems = []
    allocated = sglang_allocations(config)
    names, expected = set(tensors), set(allocated)
    for label, odd in (("missing", expected - names), ("not loadable by sglang", names - expected),
                       ("not in the artifact", names - set(art.tensors)), ("not exported", set(art.tensors) - names)):
        if odd:
            problems.append(f"{len(odd)} tensors {label}, e.g. {sorted(odd)[0]}")
    for name in sorted(names & expected):
        t, (dtype, shape) = tensors[name], allocated[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            problems.append(f"{name} is {t.dtype} {tuple(t.shape)}, sglang allocates {dtype} {shape}")
    differ = [name for name in sorted(names & set(art.tensors)) if not same_bytes(tensors[name], art.tensors[name])]
    if differ:
        problems.append(f"{len(differ)} tensors differ from the artifact byte for byte, e.g. {differ[0]}")
    return problems


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def engine_artifact(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Artifact:
    """The exported checkpoint as our engine's input: the linears' shapes come from config.json (as sglang
    derives them), the norms are run as stored, as sglang runs them."""
    dims = synthetic.ModelDims.from_config(config)
    modules = {f"model.layers.{i}.{lname}": shape
               for i in range(dims.layers) for lname, shape in dims.linear_shapes().items()}
    qconfig = quantization_config(config["quantization_config"]["group_size"], modules, {"name": "sglang export"})
    return Artifact(path=folder, config={**config, "quantization_config": qconfig}, tensors=tensors)


def ours_logits(engine: Engine, prompts: torch.Tensor, steps: int):
    """Prefill logits [B, T, V], the logits [B, V] of `steps` greedy decode steps over the KV4 cache, and
    their input tokens [B, steps]."""
    engine.prefill_fp16 = True  # a fresh prompt attends over its FP16 K/V, as in sglang (and our CUDA default)
    engine.reset(prompts.shape[0], prompts.shape[1] + steps)
    prefill = engine.prefill(prompts, all_logits=True)
    decode, tokens = [], []
    token = prefill[:, -1].argmax(-1)
    for _ in range(steps):
        tokens.append(token)
        decode.append(engine.decode_step(token).clone())  # a CUDA-graph step reuses its output buffer
        token = decode[-1].argmax(-1)
    return prefill, decode, torch.stack(tokens, dim=1) if tokens else prompts[:, :0]


def sglang_logits(engine: Engine, prompts: torch.Tensor, tokens: torch.Tensor):
    """The same, with sglang's FP16 KV cache: each decode step is the last position of a fresh prefill
    of prompt + tokens so far (causal attention over unquantized K/V, which is what that cache holds)."""
    engine.prefill_fp16 = True
    engine.reset(prompts.shape[0], prompts.shape[1])
    prefill = engine.prefill(prompts, all_logits=True)
    decode = []
    for s in range(tokens.shape[1]):
        ids = torch.cat([prompts, tokens[:, : s + 1]], dim=1)
        engine.reset(ids.shape[0], ids.shape[1])
        decode.append(engine.prefill(ids))
    return prefill, decode


def logits_diff(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Max abs difference, relative Frobenius difference, and the share of positions with the same top-1."""
    got, want = got.float(), want.float()
    return {"max_abs": float((got - want).abs().max()), "rel": float((got - want).norm() / want.norm()),
            "top1": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def check_format(fmt: str, shape_name: str, args: argparse.Namespace, device: torch.device, backend_name: str) -> dict:
    """One format end to end: build, write, export, read back, compare bytes, run both semantics, compare logits."""
    group, times, t0 = FORMATS[fmt], {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"qoq-sglang-check-{fmt}-") as tmp:
        path = write_synthetic_artifact(shape_name, group, device, args.seed, Path(tmp))
        times["build_write"] = time.perf_counter() - t0
        out = export_sglang(path, Path(tmp) / "sglang")
        times["export"] = time.perf_counter() - t0 - sum(times.values())
        art = read_artifact(path)
        config, tensors = read_export(out)
        problems = config_problems(art, config) + tensor_problems(art, config, tensors)
        times["read_compare"] = time.perf_counter() - t0 - sum(times.values())
        result = {"format": fmt, "group_size": group, "export_problems": problems, "bytes_identical": not problems,
                  "tensors": len(tensors), "export_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
        if problems:  # the engine would run something other than the artifact: nothing to compare
            return {**result, "ok": False, "seconds": time.perf_counter() - t0, "timings": times}
        result.update(compare_semantics(art, engine_artifact(out, config, tensors), args, device, backend_name))
    times["run"] = time.perf_counter() - t0 - sum(times.values())
    # per-channel prefill differs by sglang's activation-sum convention: reported, not checked
    gated = [result["prefill_same_semantics"]] + ([result["prefill"]] if group != -1 else [])
    result["ok"] = all(d["rel"] <= MAX_REL for d in gated) and all_finite(result)
    return {**result, "seconds": time.perf_counter() - t0, "timings": times}


def compare_semantics(art: Artifact, exported: Artifact, args: argparse.Namespace, device: torch.device,
                      backend_name: str) -> dict:
    """Ours on the artifact against the exported tensors run with our semantics (the same numbers: the export
    changes nothing the engine reads) and with sglang's; one engine at a time on the device."""
    vocab = int(art.config["vocab_size"])
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen).to(device)
    backend = get_backend(backend_name, device)
    # each engine is a temporary: its device copy of the weights is freed before the next one loads
    ours_prefill, ours_decode, tokens = ours_logits(Engine(art, device=device, backend=backend), prompts,
                                                    args.decode_steps)
    same_prefill = ours_logits(Engine(exported, device=device, backend=backend), prompts, 0)[0]
    sg_prefill, sg_decode = sglang_logits(Engine(exported, device=device, backend=sglang_backend(backend)), prompts,
                                          tokens)
    decode = logits_diff(torch.stack(sg_decode, 1), torch.stack(ours_decode, 1)) if ours_decode else None
    return {"backend": backend.describe(), "prefill_same_semantics": logits_diff(same_prefill, ours_prefill),
            "prefill": logits_diff(sg_prefill, ours_prefill), "decode": decode}


def all_finite(result: dict) -> bool:
    values = [v for key in ("prefill_same_semantics", "prefill", "decode") if result.get(key)
              for v in result[key].values()]
    return all(math.isfinite(v) for v in values)


def print_table(results: list[dict]) -> None:
    print(f"{'format':<12} {'logits vs ours on the artifact':<34} {'max abs diff':>12} {'rel diff':>10} {'top-1':>7} "
          f"{'seconds':>8}  check")
    for r in results:
        if r["export_problems"]:
            print(f"{r['format']:<12} {'(export)':<34} {'':>12} {'':>10} {'':>7} {r['seconds']:>8.1f}  FAIL: "
                  + "; ".join(r["export_problems"]))
            continue
        gated = r["group_size"] != -1
        rows = [("export, our semantics, prefill", r["prefill_same_semantics"], True),
                ("export, sglang semantics, prefill", r["prefill"], gated)]
        if r["decode"]:
            rows.append(("  decode (FP16 KV vs our KV4)", r["decode"], False))
        for i, (label, d, checked) in enumerate(rows):
            seconds = f"{r['seconds']:>8.1f}" if i == 0 else f"{'':>8}"
            verdict = ("ok" if d["rel"] <= MAX_REL else "FAIL") if checked else "reported"
            print(f"{r['format']:<12} {label:<34} {d['max_abs']:>12.3e} {d['rel']:>10.3e} {d['top1']:>7.3f} {seconds}  "
                  f"{verdict}")


def run_checks(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    get_backend(args.backend, device)  # an impossible backend fails before anything is built
    for name in ("batch", "prompt_len"):
        if getattr(args, name) < 1:
            raise QoqError(f"--{name.replace('_', '-')} must be >= 1")
    if args.decode_steps < 0:
        raise QoqError("--decode-steps must be >= 0")
    with registered_shape(args.shape, args.layers) as shape_name:
        layers = synthetic.SHAPES[shape_name]["num_hidden_layers"]
        results = [check_format(fmt, shape_name, args, device, args.backend) for fmt in FORMATS]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"shape": args.shape, "layers": layers, "device": str(device), "gpu": gpu, "batch": args.batch,
            "prompt_len": args.prompt_len, "decode_steps": args.decode_steps, "seed": args.seed,
            "ok": all(r["ok"] for r in results), "max_rel": MAX_REL, "notes": NOTES, "formats": results}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run_checks(args)
    except QoqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sglang export check: {report['shape']} ({report['layers']} layers) on {report['gpu'] or report['device']}, "
          f"{report['batch']} x {report['prompt_len']} tokens + {report['decode_steps']} decode steps")
    print_table(report["formats"])
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "sglang_check.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'all checks passed' if report['ok'] else 'CHECK FAILED'}; wrote {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
