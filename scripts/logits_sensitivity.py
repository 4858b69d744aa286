"""Which op makes the cupy engine's whole-model logits differ from the reference's, and is it chaos or a bug?

    python scripts/logits_sensitivity.py ARTIFACT [--windows 4] [--seq-len 2048] [--quick] [--json OUT]

Teacher-forced comparisons (qoq.verify.backend_compare.compare_backends) of the reference backend against:
  - cupy:                 every kernel from cupy (what `qoq verify --backend cupy` runs);
  - cupy only <op>:       the reference with that one op taken from cupy;
  - cupy but <op>:        cupy with that one op taken from the reference;
  - reference, 1-ulp:     the reference whose RMSNorm output is nudged by one fp32 ulp before quantization
                          (a perturbation far below any kernel error): the model's own sensitivity.
If "reference, 1-ulp" is as far from the reference as cupy is, the gap is the quantized model's chaos (a code
flip grows through the layers), not a kernel error; the op-by-op check (`qoq verify --check-kernels`) bounds
each kernel's own error.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="only cupy and the 1-ulp reference")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this check compares the cupy kernels with the reference: it needs a CUDA GPU", file=sys.stderr)
        return 1
    from qoq.formats.artifact import read_artifact
    from qoq.scheme import ops
    from qoq.runtime.backend import Backend, cupy_backend, reference_backend
    from qoq.verify.compare import load_windows
    from qoq.verify.backend_compare import compare_backends

    art = read_artifact(args.artifact)
    windows, _ = load_windows(art, None, args.seq_len, args.windows)
    dev = torch.device("cuda")
    ref, cup = reference_backend(), cupy_backend()
    own = [n for n in ("rmsnorm_quantize", "quantize_act", "silu_mul_quantize", "w4a8_linear", "kv4_append",
                       "decode_attention_kv4", "rmsnorm") if n not in cup.fallbacks]

    def mixed(name, base, other, ops_from_other):
        return Backend(name, {**base.fns, **{n: other.fns[n] for n in ops_from_other}})

    def nudged_rmsnorm_quantize(x, weight, eps, padded_in, with_qsum=False):
        y = ops.rmsnorm(x, weight, eps)
        return ops.quantize_act(torch.nextafter(y, torch.full_like(y, float("inf"))), padded_in, with_qsum)

    cands = {"cupy": cup, "reference, 1-ulp rmsnorm": Backend("ref-ulp", {**ref.fns,
                                                                          "rmsnorm_quantize": nudged_rmsnorm_quantize})}
    for n in [] if args.quick else own:
        cands[f"cupy only {n}"] = mixed(n, ref, cup, [n])
        cands[f"cupy but {n}"] = mixed(n, cup, ref, [n])
    rows = {}
    print(f"{'candidate vs reference':<36} {'frobenius':>10} {'top-1':>7} {'KL':>9} {'PPL diff':>9}")
    for name, be in cands.items():
        o = compare_backends(art, windows, dev, be, ref, floor=False)["overall"]
        rows[name] = o
        print(f"{name:<36} {o['frobenius_rel_error']:10.3e} {o['top1_agreement']:7.4f} {o['kl_mean']:9.2e} "
              f"{100 * o['ppl_rel_diff']:+8.3f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
