"""Loading: external data, old-IR initializer inputs, constant-producing subgraphs, stale value_info, shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import compressor
from compressor.errors import CompressorError
from compressor.engine.loading import load_model, parse_input_shapes, resolve_input_shapes
from tests.graphs import GraphBuilder, head


def base_model():
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 4, 16)])
    x = b.op("Relu", [b.conv(x, 16, 16)])
    return b.model(head(b, x, 16))


def test_external_data_model(tmp_path):
    model = base_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
                    size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    result = compressor.compress(path, method="l1", ratio=0.4)
    assert result.report["verified"]


def test_initializers_listed_as_inputs_are_constants():
    model = base_model()
    model.ir_version = 3
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    result = compressor.compress(model, method="l1", ratio=0.4)
    assert result.report["verified"]
    assert [i.name for i in result.model.graph.input] == ["x"]


def test_weights_from_constant_and_identity_nodes_are_folded():
    model = base_model()
    graph = model.graph
    conv = next(n for n in graph.node if n.op_type == "Conv")
    weight = next(t for t in graph.initializer if t.name == conv.input[1])
    graph.initializer.remove(weight)
    const = helper.make_node("Constant", [], ["w_const"], value=weight, name="make_w")
    ident = helper.make_node("Identity", ["w_const"], [conv.input[1]], name="copy_w")
    graph.node.insert(0, ident)
    graph.node.insert(0, const)
    shape = helper.make_node("ConstantOfShape", ["shape_c"], ["zeros_b"], name="zeros",
                             value=numpy_helper.from_array(np.zeros(1, np.float32)))
    graph.initializer.append(numpy_helper.from_array(np.array([16], np.int64), "shape_c"))
    graph.node.insert(0, shape)
    conv.input.append("zeros_b") if len(conv.input) == 2 else None
    loaded = load_model(model)
    assert not [n for n in loaded.graph.node if n.op_type in ("Constant", "Identity", "ConstantOfShape")]
    assert compressor.compress(model, method="l1", ratio=0.4).report["verified"]


def test_stale_value_info_is_dropped():
    model = base_model()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    model.graph.value_info.append(helper.make_tensor_value_info(relu.output[0], onnx.TensorProto.FLOAT, [1, 99, 3, 3]))
    assert compressor.compress(model, method="l1", ratio=0.4).report["verified"]


def test_dynamic_batch_defaults_to_one_and_input_shape_overrides():
    model = base_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    assert resolve_input_shapes(model, None) == {"x": [1, 4, 8, 8]}
    assert resolve_input_shapes(model, parse_input_shapes(["2x4x8x8"])) == {"x": [2, 4, 8, 8]}
    result = compressor.compress(model, method="l1", ratio=0.4, input_shapes={"x": [2, 4, 8, 8]})
    assert result.report["verified"]
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    with pytest.raises(CompressorError):
        parse_input_shapes(["x:1x0x3"])
    with pytest.raises(CompressorError):
        resolve_input_shapes(model, {"y": [1, 2]})


def test_old_opset_is_refused():
    model = base_model()
    model.opset_import[0].version = 7
    with pytest.raises(CompressorError, match="opset 7"):
        load_model(model)


def test_the_callers_model_object_is_not_modified():
    model = base_model()
    before = model.SerializeToString()
    compressor.compress(model, method="l1", ratio=0.4)
    assert model.SerializeToString() == before
