"""Streaming safetensors I/O: what we write, safetensors reads bit for bit, and the other way round."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_lite.errors import ShardError
from qlora_lite.safetensors_io import ShardWriter, iter_tensors, read_header, write_tensors


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(5, generator=gen),
        "half": torch.randn(3, 2, generator=gen).half(),
        "double": torch.randn(2, generator=gen).double(),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "packed": torch.randint(0, 255, (9, 1), dtype=torch.uint8, generator=gen),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def test_safetensors_reads_what_we_write(tmp_path):
    tensors = sample_tensors()
    nbytes = write_tensors(tmp_path / "ours.safetensors", tensors)
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert nbytes == sum(t.numel() * t.element_size() for t in tensors.values()) == 70 + 20 + 12 + 16 + 48 + 9 + 3 + 4 + 0  # 7x5 bf16, 5 fp32, ...


def test_we_read_what_safetensors_writes(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    read = dict(iter_tensors(tmp_path / "theirs.safetensors"))
    assert sorted(read) == sorted(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_header_lists_tensors_in_data_order(tmp_path):
    write_tensors(tmp_path / "a.safetensors", {"b": torch.zeros(2), "a": torch.zeros(3)})
    entries, data_start = read_header(tmp_path / "a.safetensors")
    assert [(e.name, e.start, e.end) for e in entries] == [("b", 0, 8), ("a", 8, 20)]
    assert data_start % 8 == 0  # header padded so that tensor data is 8-byte aligned
    assert (tmp_path / "a.safetensors").stat().st_size == data_start + 20


def test_truncated_and_corrupt_files_are_named(tmp_path):
    path = tmp_path / "t.safetensors"
    write_tensors(path, {"w": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match="truncated: tensor w"):
        list(iter_tensors(path))
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ShardError, match="corrupt"):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(ShardError, match="not a safetensors file"):
        read_header(path)


def test_writer_refuses_tensors_out_of_announced_order(tmp_path):
    with pytest.raises(ShardError, match="wrote b .* expected a"):
        with ShardWriter(tmp_path / "w.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]) as writer:
            writer.write("b", torch.zeros(2))
    writer = ShardWriter(tmp_path / "w.safetensors", [("a", torch.float32, (2,))])
    with pytest.raises(ShardError, match="1 announced tensors were never written"):
        writer.close()
