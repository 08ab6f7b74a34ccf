"""Tiny hand-built ONNX graphs for the rule tests (one builder per pattern)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Build a float32 NCHW graph node by node with seeded random weights."""

    def __init__(self, shape=(1, 4, 8, 8), seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
        self.opset = opset
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, value, prefix: str = "w") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"{op_type}_"), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True, stride: int = 1) -> str:
        w = self.const(self.rng.standard_normal((cout, cin // group, k, k)).astype(np.float32) * 0.3)
        inputs = [x, w] + ([self.const(self.rng.standard_normal(cout).astype(np.float32) * 0.1, "b")] if bias else [])
        return self.op("Conv", inputs, pads=[k // 2] * 4, group=group, strides=[stride, stride])

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.1, r.standard_normal(c) * 0.1, r.uniform(0.5, 1.5, c)]
        return self.op("BatchNormalization", [x] + [self.const(p.astype(np.float32), "bn") for p in params])

    def gemm(self, x: str, k: int, n: int) -> str:
        w = self.const(self.rng.standard_normal((n, k)).astype(np.float32) * 0.1)
        b = self.const(self.rng.standard_normal(n).astype(np.float32) * 0.1, "b")
        return self.op("Gemm", [x, w, b], transB=1)

    def model(self, *outputs: str) -> onnx.ModelProto:
        outs = [onnx.ValueInfoProto(name=o) for o in outputs]
        graph = helper.make_graph(self.nodes, "test", self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - graphs with custom ops keep untyped outputs
            return model
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
        return model


def head(b: GraphBuilder, x: str, c: int, classes: int = 5) -> str:
    """Global pool → flatten → gemm: a classifier head whose output channels are fixed."""
    return b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), c, classes)
