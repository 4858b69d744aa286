"""Model sources: the embedded default (SmolLM2-135M-Instruct GGUF), .gguf files, HF folders, hub ids."""

from qoq.models.sources import SUPPORTED_ARCHITECTURES, LoadedModel, load_model, load_reference_model

__all__ = ["SUPPORTED_ARCHITECTURES", "LoadedModel", "load_model", "load_reference_model"]
