"""qlora-lite: QLoRA fine-tuning on one consumer GPU, small enough to read in an afternoon."""

__version__ = "0.1.0"
