"""Benchmarks (the kernel part of `qoq bench`): `qoq.bench.gemm` times the W4A8 GEMM and KV4 decode attention."""
