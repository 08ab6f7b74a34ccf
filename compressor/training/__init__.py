"""PyTorch side of compressor: models, data on the GPU, training loops, export. Imports torch; the ONNX path never
imports this package."""
