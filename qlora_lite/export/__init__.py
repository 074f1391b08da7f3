"""The export wing: merge an adapter into its base as a plain Hugging Face model (merge.py), write a GGUF
for llama.cpp, LM Studio and Ollama (gguf.py, with llama.cpp's own tools in llama_cpp.py and the chat
templates in templates.py), each checked against what it was made from (verify.py: probes, tolerances).

May import: config, errors, folders, quant, memory, safetensors_io, model_paths, data, methods, generate.
Nothing here imports training.
"""
