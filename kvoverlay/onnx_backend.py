"""``kvoverlay.onnx_backend``: the :mod:`onnx.backend` entry point (an alias of :mod:`kvoverlay.host.onnx_backend`).

Like the command line, this top-level name sits above every layer; the implementation lives in the host.
"""

from kvoverlay.host.onnx_backend import DEVICES, OverlayBackend, OverlayRep, prepare, run_model, supports_device

__all__ = ["DEVICES", "OverlayBackend", "OverlayRep", "prepare", "run_model", "supports_device"]
