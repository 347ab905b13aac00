"""Engine backends: one interface, implemented by ONNX Runtime (CPU/CUDA) and TensorRT."""
