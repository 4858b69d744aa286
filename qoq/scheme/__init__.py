"""The W4A8KV4 integer scheme, the bottom layer everything else imports: progressive group quantization of
weights (`progressive`), the kernel layout of packed weights (`layout`), the runtime op contract with its
torch twins (`ops`: activation INT8, KV4, the W4A8 linear) and fake quantization built on them (`fakequant`)."""
