"""Inference engines behind one interface (`infer` on NCHW float32 tiles, as run_tiled calls
it): torch (pipeline.tiling.Engine), ncnn, openvino, and `auto`, which measures them here."""

from __future__ import annotations

from pipeline.runtimes.calibration import MIN_AGREEMENT_DB, Measurement, calibrate, psnr8

ENGINES = ("torch", "ncnn", "openvino", "auto")

__all__ = ["ENGINES", "MIN_AGREEMENT_DB", "Measurement", "calibrate", "psnr8"]
