"""fp16 conversion with ONNX Runtime's float16 converter (`onnxruntime.transformers.float16`).

Why ONNX Runtime's converter rather than onnxconverter-common's: it ships inside the onnxruntime package that runs
the model (no extra dependency, versions move together), it is a maintained fork of the same function with fixes
that matter here (ops whose inputs must stay float, such as Resize scales; initializers shared by fp32 and fp16
nodes are kept in both precisions), and it accepts a ModelProto. Inputs and outputs stay fp32 by default
(`keep_io_types`), so a deployed client does not change.
"""

from __future__ import annotations

import onnx

from compressor.errors import CompressorError, first_line


def default_fp32_ops() -> list[str]:
    """The op types ONNX Runtime's converter keeps in fp32 by default (no fp16 kernels or precision-critical)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return list(DEFAULT_OP_BLOCK_LIST)


def to_fp16(proto: onnx.ModelProto, keep_io_types: bool = True, fp32_ops: tuple[str, ...] = (),
            fp32_nodes: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A float16 copy of `proto`; `fp32_ops` (op types, on top of the default list) and `fp32_nodes` (node names)
    stay fp32 with Casts around them; with `keep_io_types` the graph inputs and outputs stay fp32."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise CompressorError("--precision fp16 needs onnxruntime (pip install 'compressor[cpu]')") from exc
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    try:
        return convert_float_to_float16(copy, keep_io_types=keep_io_types,
                                        op_block_list=sorted(set(default_fp32_ops()) | set(fp32_ops)),
                                        node_block_list=list(fp32_nodes))
    except Exception as exc:  # noqa: BLE001 - the converter raises assertion and value errors
        first = first_line(exc)
        raise CompressorError(f"fp16 conversion failed: {first}") from exc
