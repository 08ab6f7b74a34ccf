"""The engine: ONNX graph in, smaller ONNX graph out, one stage per module.

graph (IR view) → loading → shapes → tracer + rules (the per-op channel rule table) → units (union-find) →
analysis (groups) + blocks (residual branches) → plan (allocators) → surgery → verify; cost counts MACs and params.
It imports nothing from methods, latency or training; ONNX Runtime comes through compressor.runtime.
"""
