"""Model repositories for tests, written into temporary folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

# Every OIP datatype, with sample rows of width 3 that exercise its range.
SAMPLES: dict[str, np.ndarray[Any, Any]] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255], [7, 8, 9]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535], [7, 8, 9]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1], [7, 8, 9]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1], [7, 8, 9]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127], [1, -1, 2]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767], [1, -1, 2]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1], [1, -1, 2]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1], [1, -1, 2]], dtype=np.int64),
    "FP16": np.array([[0.5, -1.25, 65504.0], [1.0, 2.0, 3.0]], dtype=np.float16),
    # BF16 travels as uint16 bit patterns: 1.0, -2.0, 0.5 ...
    "BF16": np.array([[0x3F80, 0xC000, 0x3F00], [0, 0x4040, 0x7F80]], dtype=np.uint16),
    "FP32": np.array([[0.25, -1.5, 3.4e38], [1.0, 2.0, 3.0]], dtype=np.float32),
    "FP64": np.array([[1e-300, -2.5, 1e300], [1.0, 2.0, 3.0]], dtype=np.float64),
    "BYTES": np.array([[b"", b"\x00\xff binary", b"text"], [b"a", b"bb", b"ccc"]], dtype=object),
}
TYPED = [name for name in SAMPLES if name not in ("FP16", "BF16")]
# ONNX Runtime keeps strings as UTF-8 text, so BYTES for the edge model are text.
TEXT_BYTES = np.array([["", "naïve", "text"], ["a", "bb", "ccc"]], dtype=object)
TEXT_BYTES[:] = [[item.encode() for item in row] for row in TEXT_BYTES.tolist()]

_ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _tensor_lines(datatypes: list[str]) -> str:
    inputs = ", ".join(f'{{ name = "in_{d}", datatype = "{d}", shape = [-1, 3] }}' for d in datatypes)
    outputs = ", ".join(f'{{ name = "out_{d}", datatype = "{d}", shape = [-1, 3] }}' for d in datatypes)
    return f"inputs = [{inputs}]\noutputs = [{outputs}]\n"


def write_identity_onnx(path: Path, datatypes: list[str]) -> None:
    """An ONNX graph that returns each input unchanged (Identity), batch dimension symbolic."""
    nodes = [helper.make_node("Identity", [f"in_{d}"], [f"out_{d}"]) for d in datatypes]
    inputs = [helper.make_tensor_value_info(f"in_{d}", _ONNX_TYPES[d], ["batch", 3]) for d in datatypes]
    outputs = [helper.make_tensor_value_info(f"out_{d}", _ONNX_TYPES[d], ["batch", 3]) for d in datatypes]
    graph = helper.make_graph(nodes, "echo", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_echo_repository(root: Path) -> Path:
    """`echo` (edge-capable datatypes, both sides), `echo_all` (all, cloud) and `echo_typed` (no FP16/BF16, cloud)."""
    edge_types = [d for d in SAMPLES if d != "BF16"]
    echo = root / "echo"
    echo.mkdir(parents=True)
    write_identity_onnx(echo / "edge.onnx", edge_types)
    (echo / "model.toml").write_text(
        _tensor_lines(edge_types)
        + '[edge]\nartifact = "edge.onnx"\n[cloud]\nfactory = "support.echo:make"\nwarmup_rows = 0\n'
        + '[routing]\noutput = "out_FP32"\noutput_kind = "probabilities"\nthreshold = 0.5\n'
    )
    echo_all = root / "echo_all"
    echo_all.mkdir()
    (echo_all / "model.toml").write_text(
        _tensor_lines(list(SAMPLES)) + '[cloud]\nfactory = "support.echo:make"\nwarmup_rows = 0\n'
    )
    echo_typed = root / "echo_typed"
    echo_typed.mkdir()
    write_identity_onnx(echo_typed / "edge.onnx", TYPED)
    (echo_typed / "model.toml").write_text(
        _tensor_lines(TYPED)
        + '[edge]\nartifact = "edge.onnx"\n[cloud]\nfactory = "support.echo:make"\nwarmup_rows = 0\n'
        + '[routing]\noutput = "out_FP32"\noutput_kind = "probabilities"\nthreshold = 0.5\n'
    )
    return root
