"""com.microsoft.MatMulNBits imported as given: onnxruntime's own int4 quantizer, compiled, decodes as onnxruntime does.

The models are the real-exporter test decoders, quantized by ``MatMulNBitsQuantizer`` (asymmetric and symmetric,
blocks of 16, 32 and 64); the golden model's greedy tokens must follow onnxruntime's run of the same file.
"""

import numpy as np
import onnx
import pytest
from kvoverlay.compiler.driver import compile_model
from kvoverlay.compiler.frontend import CompileError
from kvoverlay.compiler.matmul_nbits import import_matmul_nbits
from kvoverlay.host.reference import compare
from kvoverlay.host.session import Session
from onnx import helper, numpy_helper

from kvoverlay import isa
from kvoverlay import numerics as nx

quantizer = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")

PROMPT = [1, 5, 9, 13, 2, 7]
NEW = 16
#: (family, symmetric, block): asymmetric and symmetric, block 32 and two other sizes
CASES = [("llama", False, 32), ("llama", True, 32), ("qwen2", False, 64), ("mistral", True, 16)]


def _quantize(path, symmetric: bool, block: int, out) -> str:
    q = quantizer.MatMulNBitsQuantizer(onnx.load(str(path)), block_size=block, is_symmetric=symmetric)
    q.process()
    onnx.save(q.model.model, str(out))
    return str(out)


@pytest.fixture(scope="module")
def quantized(exported_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("nbits")
    return {(f, s, b): _quantize(exported_models[f], s, b, d / f"{f}-{'sym' if s else 'asym'}-{b}.onnx")
            for f, s, b in CASES}


def _given(path):
    """name -> Prequantized of every MatMulNBits weight in the file, as the importer reads it."""
    model = onnx.load(path)
    return import_matmul_nbits(model, {})


@pytest.mark.parametrize("family,symmetric,block", CASES, ids=[f"{f}-{'sym' if s else 'asym'}-{b}" for f, s, b in CASES])
def test_matmul_nbits_follows_onnxruntime(quantized, family, symmetric, block):
    path = quantized[(family, symmetric, block)]
    b, _ = compile_model(path, "tiny", weights="w16", max_seq=len(PROMPT) + NEW)
    gemvs = [i for i in b.instructions if i.op == "GEMV"]
    fmts = {isa.weight_layout(i) for i in gemvs}
    # onnxruntime's symmetric quantizer keeps each group's sign in its scale: negative scales make it uint4 too
    assert fmts == {("uint4", block)}
    res = Session(b, backend="isa").generate(PROMPT, NEW)
    ref = compare(path, PROMPT, res.tokens, res.logits)
    print(f"MatMulNBits {family} {'sym' if symmetric else 'asym'} block {block}: tokens {ref['matching_prefix']}/{NEW}, "
          f"cosine {ref['logits_cosine_min']}")
    assert ref["token_match"], (res.tokens, ref["tokens"])
    assert ref["logits_cosine_min"] >= 0.999


def test_asymmetric_codes_are_placed_unchanged(quantized):
    path = quantized[("llama", False, 32)]
    given = _given(path)
    b, _ = compile_model(path, "tiny", weights="w16", max_seq=8)
    cfg = b.config
    by_shape = {}
    for ins in b.instructions:
        if ins.op == "GEMV":
            by_shape.setdefault((ins.rows, ins.cols), []).append(ins)
    checked = 0
    for pre in given.values():
        assert pre.zero_points is not None and np.all(pre.scales >= 0)
        rows, cols = pre.q.shape
        for ins in by_shape[(rows, cols)]:
            stride = nx.row_stride(cols, "uint4", 32, cfg.port_bytes)
            blob = bytes(b.image[ins.addr: ins.addr + rows * stride])
            raw = np.frombuffer(blob, np.uint8).reshape(rows, stride)
            hdr = raw[:, :2 * (cols // 32)].copy().view("<u2").astype(np.int64)
            codes = raw[:, 2 * (cols // 32): 2 * (cols // 32) + cols // 2]
            q = np.empty((rows, cols), np.int64)
            q[:, 0::2], q[:, 1::2] = codes & 0xF, codes >> 4
            if np.array_equal(q, pre.q) and np.array_equal(hdr >> nx.UINT4_SCALE_BITS, pre.zero_points):
                s = (hdr & ((1 << nx.UINT4_SCALE_BITS) - 1)) * 2.0 ** ins.sexp
                assert np.all(np.abs(s - pre.scales) <= 2.0 ** (ins.sexp - 1))  # scales rounded to nearest
                checked += 1
                break
    assert checked == len(given) == 15


def _nbits_model(bits=4, block=32, k=64, n=8, zero_points=True):
    """One MatMulNBits node y = x @ W, with random codes."""
    rng = np.random.default_rng(0)
    groups = -(-k // block)
    b = rng.integers(0, 256, (n, groups, block * bits // 8), dtype=np.uint8)
    inits = [numpy_helper.from_array(b, "B"),
             numpy_helper.from_array(rng.uniform(0.01, 0.1, n * groups).astype(np.float32), "scales")]
    inputs = ["x", "B", "scales"]
    if zero_points:
        inits.append(numpy_helper.from_array(rng.integers(0, 256, n * -(-groups // 2), dtype=np.uint8), "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["y"], name="mm", domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("kw,message", [
    ({"bits": 8}, "node mm: MatMulNBits with bits=8 is not supported; supported: bits=4"),
    ({"block": 256, "k": 512}, "node mm: MatMulNBits with block_size=256 is not supported; supported: 16, 32, 64, 128"),
    ({"block": 32, "k": 48}, "node mm: MatMulNBits has K=48, not a multiple of block_size=32"),
])
def test_unsupported_matmul_nbits_is_one_line(kw, message):
    with pytest.raises(CompileError) as e:
        compile_model(_nbits_model(**kw), "tiny")
    assert str(e.value) == message


@pytest.mark.parametrize("zero_points", [True, False])
def test_dequantized_weight_is_onnxruntimes(zero_points):
    """The float matrix the importer computes (for the compiler's float reference) is onnxruntime's own."""
    ort = pytest.importorskip("onnxruntime")
    model = _nbits_model(zero_points=zero_points)
    x = np.random.default_rng(1).normal(size=(1, 64)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    pre = next(iter(_given_model(model).values()))
    assert pre.fmt == ("uint4" if zero_points else "int4")
    np.testing.assert_allclose(x @ pre.dequantize().T, want, rtol=1e-5, atol=1e-6)


def _given_model(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    found = import_matmul_nbits(m, weights := {})
    assert [n.op_type for n in m.graph.node] == ["MatMul"] and set(weights) == set(found)
    assert not {i.name for i in m.graph.initializer} & {"B", "scales", "zp"}
    return found


def test_cli_names_the_unsupported_block_in_one_line(tmp_path):
    from test_cli import assert_one_line_error, kvo

    path = tmp_path / "nbits.onnx"
    onnx.save(_nbits_model(block=256, k=512), str(path))
    res = kvo("compile", path, "-o", tmp_path / "out.kvo")
    assert_one_line_error(res, "node mm: MatMulNBits with block_size=256 is not supported")
    assert not (tmp_path / "out.kvo").exists()


@pytest.mark.parametrize("source", ["imported", "compiled"])
def test_uint4_program_on_the_rtl_is_the_golden_models(quantized, exported_models, source):
    """A decoder with uint4 weights, imported from MatMulNBits or quantized by the compiler, decodes on the Verilated
    overlay exactly as on the golden model: tokens, and logits bit for bit."""
    pytest.importorskip("amaranth")
    pytest.importorskip("cocotb_tools")
    from kvoverlay.sim.rtl import build_model

    from kvoverlay.config import PRESETS

    build_model(PRESETS["tiny"])
    if source == "imported":
        program, _ = compile_model(quantized[("llama", False, 32)], "tiny", max_seq=8)
    else:
        program, _ = compile_model(str(exported_models["qwen2"]), "tiny", weights="uint4", max_seq=8)
    assert {isa.weight_layout(i)[0] for i in program.instructions if i.op == "GEMV"} == {"uint4"}
    gold = Session(program, "isa").generate([3, 11], 3)
    with Session(program, "rtl") as sess:
        rtl = sess.generate([3, 11], 3).result()
    assert rtl.tokens == gold.tokens
    assert all(np.array_equal(a, b) for a, b in zip(rtl.logits, gold.logits, strict=True))
