"""Bridges to the libraries lowbit's users already run: `lowbit.integrations.transformers` (a
quantization method for `from_pretrained`) and `lowbit.integrations.peft` (LoRA on lowbit layers).
Each is imported only when asked for; `import lowbit` imports neither transformers nor peft."""
