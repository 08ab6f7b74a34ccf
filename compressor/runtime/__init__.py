"""ONNX Runtime concerns: targets (where a model runs), inputs (shapes and seeded feeds), sessions (the one place
sessions are created), probes (GPU memory, RSS, CPU pinning, the environment), handles (in-process and child-process
sessions), bench (the benchmark runner) and report (its tables, JSON, Markdown and plot).
"""
