"""What identifies a qoq artifact: its quantization method name and format version (config.json's
`quantization_config`). The tensors per linear are `expected_shapes` in qoq.formats.artifact."""
QUANT_METHOD = "qoq"
FORMAT_VERSION = 1
