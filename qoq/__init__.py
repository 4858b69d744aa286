"""qoq: QoQ W4A8KV4 quantization of Llama-family models, with a runtime that executes the artifacts."""
from qoq.version import __version__  # noqa: F401 - the package version


def quantize(**options):
    """Quantize a model: `qoq.quantize(model=None, calib=None, group_size=128, ...)` -> QuantizeResult."""
    from qoq.pipeline import QuantizeOptions
    from qoq.pipeline import quantize as _quantize
    return _quantize(QuantizeOptions(**options))


def load(path):
    """Read and validate an artifact folder (never unpickles)."""
    from qoq.formats.artifact import read_artifact
    return read_artifact(path)
