"""qoq: QoQ W4A8KV4 quantization of Llama-family models, with a runtime that executes the artifacts."""
__version__ = "0.1.0"


def quantize(**options):
    """Quantize a model: `qoq.quantize(model=None, calib=None, group_size=128, ...)` -> QuantizeResult."""
    from qoq.pipeline import QuantizeOptions
    from qoq.pipeline import quantize as _quantize
    return _quantize(QuantizeOptions(**options))


def load(path):
    """Read and validate an artifact folder (never unpickles)."""
    from qoq.formats.artifact import read_artifact
    return read_artifact(path)
