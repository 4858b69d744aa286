"""Verification of artifacts: WikiText-2 perplexity against the FP16 source, kernel-vs-reference numerics."""
from qoq.verify.perplexity import VerifyOptions, VerifyResult, load_wikitext2, token_windows, verify

__all__ = ["VerifyOptions", "VerifyResult", "load_wikitext2", "token_windows", "verify"]
