"""Offline builders that turn model checkpoints into engine artefacts (ONNX graph + tokenizer)."""
