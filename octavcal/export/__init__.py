"""Exports of scale files to runtimes: ONNX QDQ (onnx.py) and TensorRT calibration caches (tensorrt.py)."""
