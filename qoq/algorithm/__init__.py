"""Pure tensor math of the QoQ recipe: rotation, smoothing, SmoothAttention, reordering, GPTQ, progressive
quantization."""
