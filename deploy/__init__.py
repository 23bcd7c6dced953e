"""From fake quantization to a deployable model: evaluate a checkpoint (``evaluate``), post-training
quantization (``ptq``), ONNX QDQ export (``onnx_qdq``) and integer weights with an integer reference
forward pass (``integer``). ``restore`` rebuilds a model from any checkpoint this tool writes."""
