"""Integrations with other libraries (transformers, peft). Each is imported only when asked for:
`import lowbit` imports none of them."""
