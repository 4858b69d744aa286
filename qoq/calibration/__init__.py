"""Calibration data: text or model samples → token samples for per-block capture."""

from qoq.calibration.data import CalibrationSet, load_calibration

__all__ = ["CalibrationSet", "load_calibration"]
