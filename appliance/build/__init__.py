"""Offline build code, apart from the serving path: checkpoints (safetensors, GGUF) read and turned into engine artefacts (ONNX graphs, tokenizers), and `models pull`."""
