"""Decoder-only LLMs: read a checkpoint, build a standard-op ONNX graph with a KV cache, run it.

- ``sources``: a llama-architecture GGUF or a Hugging Face Llama/Qwen2 checkpoint becomes one
  ``DecoderSource`` (config, float32 weights in HF naming, tokenizer, chat template, special ids).
- ``builder``: ``build_decoder`` writes ``model.onnx`` (opset 17, default domain only, so the same
  file serves ONNX Runtime on CPU and TensorRT on GPUs), ``tokenizer.json`` and ``generation.json``.
- ``chat_template``: renders a HF chat template the way ``transformers`` does.
- ``runtime``: a small ONNX Runtime wrapper (prefill / decode with a row-editable KV state) and
  greedy generation, the reference the serving scheduler is checked against.
"""
