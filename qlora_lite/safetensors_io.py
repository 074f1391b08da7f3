"""Reading and writing safetensors files one tensor at a time.

`safetensors.torch.save_file` serialises a whole dict to one bytes buffer before writing, and
`safe_open` maps the file so every tensor read stays resident until it is closed: for a
5 GB shard that is several copies of it in memory at once. Merging an 8B model on a small
machine needs less, so these functions read each tensor with plain file reads and write
each one as soon as it exists. The format (an 8-byte little-endian header length, a JSON
header of dtype / shape / byte offsets, then the raw little-endian bytes) is the one
https://github.com/huggingface/safetensors documents; `safetensors.torch.load_file` reads
what we write, and tests check both directions.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import ShardError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a larger header means a corrupt file
SAFE_INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's map of tensor name -> shard file


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section
    end: int


def read_header(path: str | Path) -> tuple[list[TensorEntry], int]:
    """The file's tensor entries in data order, and the byte position where data starts."""
    with open(path, "rb") as f:
        raw_length = f.read(8)
        if len(raw_length) != 8:
            raise ShardError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw_length)
        if length > MAX_HEADER_BYTES:
            raise ShardError(f"{path} is corrupt: its header claims {length} bytes")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShardError(f"{path} is corrupt: unreadable header ({err})") from err
    header.pop("__metadata__", None)
    entries = [TensorEntry(name, v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for name, v in header.items()]
    return sorted(entries, key=lambda e: e.start), 8 + length


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order, each read into its own memory; nothing stays mapped."""
    entries, data_start = read_header(path)
    with open(path, "rb") as f:
        for entry in entries:
            if entry.dtype not in SAFETENSORS_DTYPES:
                raise ShardError(f"{path}: tensor {entry.name} has dtype {entry.dtype}, which qlora-lite cannot merge")
            yield entry.name, _read_entry(f, path, entry, data_start)


def _read_entry(f: BinaryIO, path: str | Path, entry: TensorEntry, data_start: int) -> torch.Tensor:
    """entry's bytes from the open file f, read into fresh memory and viewed as its dtype and shape (a dtype we know)."""
    buffer = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    f.seek(data_start + entry.start)
    if f.readinto(memoryview(buffer.numpy())) != buffer.numel():
        raise ShardError(f"{path} is truncated: tensor {entry.name} runs past the end of the file")
    return buffer.view(SAFETENSORS_DTYPES[entry.dtype]).reshape(entry.shape)


class ShardWriter:
    """Writes a safetensors file whose tensors are announced up front and then written one by one.

    The header needs every tensor's dtype and shape before the first byte of data, so the
    caller lists them (in the order it will write them) and then calls write() for each.
    """

    def __init__(self, path: str | Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        self.path = Path(path)
        self.layout = layout
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in layout:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # pad to 8 bytes so that the data is aligned, as safetensors does
        self.data_bytes = offset
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by close() / the context manager
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_dtype, want_shape = self.layout[self.written]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want_name, want_dtype, tuple(want_shape)):
            raise ShardError(f"{self.path}: wrote {name} {tensor.dtype} {tuple(tensor.shape)}, expected {want_name} {want_dtype} {want_shape}")
        self.file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.written += 1

    def close(self) -> None:
        self.file.close()
        if self.written != len(self.layout):
            raise ShardError(f"{self.path}: {len(self.layout) - self.written} announced tensors were never written")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.file.close()


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write a dict of tensors (already in memory) to one safetensors file; returns its data bytes."""
    with ShardWriter(path, [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return writer.data_bytes


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One named tensor of a safetensors file, reading only its bytes (a 5 GB shard is not mapped or read whole)."""
    entries, data_start = read_header(path)
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        raise ShardError(f"{path} has no tensor {name}")
    if entry.dtype not in SAFETENSORS_DTYPES:
        raise ShardError(f"{path}: tensor {name} has dtype {entry.dtype}, which qlora-lite cannot read")
    with open(path, "rb") as f:
        return _read_entry(f, path, entry, data_start)


class CheckpointReader:
    """A model folder's safetensors weights by tensor name, one tensor read at a time (a sharded checkpoint through its index).

    Each read takes only that tensor's bytes from its file into fresh memory, as read_tensor does, so
    loading a model layer by layer never holds (or maps) more of the checkpoint than the tensor it reads.
    """

    def __init__(self, folder: str | Path) -> None:
        root = Path(folder)
        index = root / SAFE_INDEX_NAME
        if index.is_file():
            files = sorted({root / name for name in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ShardError(f"{root} holds no safetensors weights (model.safetensors or {SAFE_INDEX_NAME} and its shards)")
        self.entries: dict[str, tuple[Path, TensorEntry, int]] = {}
        for file in files:
            entries, data_start = read_header(file)
            self.entries.update({entry.name: (file, entry, data_start) for entry in entries})

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise ShardError(f"the checkpoint has no tensor {name}")
        file, entry, data_start = self.entries[name]
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise ShardError(f"{file}: tensor {name} has dtype {entry.dtype}, which qlora-lite cannot read")
        with open(file, "rb") as f:
            return _read_entry(f, file, entry, data_start)
