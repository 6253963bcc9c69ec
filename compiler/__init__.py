"""ONNX decoder -> overlay program compiler: ``driver.compile_model`` runs the pass list ``passes.PIPELINE``."""
