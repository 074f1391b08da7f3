"""The methods wing: each fine-tuning method in its own file (lora, prompt_tuning, selective, bottleneck, full),
the `Method` type (method.py), the table of them (table.py), and the adapter folder they share (folder.py).

May import: config, errors, quant, safetensors_io, model_paths, data (IGNORE_INDEX). Nothing here imports
training or export.
"""
