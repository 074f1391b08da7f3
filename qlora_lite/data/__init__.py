"""The data wing: records from files or the hub (records.py), the prompt formats and chat templates (formats.py),
tokenizing and loss masking (tokenizing.py), the on-disk cache of tokenized examples (cache.py), and packing,
padding and the order of micro-batches (batching.py).

May import: config, errors, folders. Nothing here imports methods, training or export.
"""
