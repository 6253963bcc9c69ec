"""Test models: small decoders built with ``onnx.helper`` (:mod:`.demo`) or exported by optimum-onnx (:mod:`.exported`).

They sit above the host (their greedy references decode with onnxruntime through :mod:`kvoverlay.host.reference`)
and are not compiler code: the compiler never imports them.
"""
