"""The export wing: merge an adapter into its base as a plain Hugging Face model (merge.py), write a GGUF
for llama.cpp, LM Studio and Ollama (gguf.py, with the chat templates in templates.py), each checked
against what it was made from. llama.cpp's own tools (llama_cpp.py) and the probes and tolerances
(verify.py) are shared modules below the wings: a GGUF base (gguf_base.py) is checked with them too.

May import: config, errors, folders, quant, llama_cpp, verify, memory, safetensors_io, gguf_base, model_paths, data, methods, generate.
Nothing here imports training.
"""
