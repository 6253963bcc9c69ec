"""Placeholder: ONNX decoder -> overlay program compiler (in progress)."""
