"""lpt_kernels.checkpoint.tensor_writer: a safetensors file written tensor by tensor, read back by the safetensors library
and by Checkpoint; atomic on failure."""
import os

import pytest
import torch
from safetensors import safe_open

from lpt_kernels.checkpoint import Checkpoint, CheckpointError, write_safetensors, write_state


def test_roundtrip_every_dtype_and_shape(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=gen, dtype=torch.float64),
        "c": torch.randn(4, 6, generator=gen).to(torch.float16).t(),           # non-contiguous
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(3, 0),
        "ids": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "flag": torch.tensor([True, False]),
    }
    path = write_state(str(tmp_path / "x.safetensors"), tensors.items(), metadata={"format": "pt", "k": 1})
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(tensors) and f.metadata() == {"format": "pt", "k": "1"}
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t), n
    with Checkpoint(path) as c:
        assert c.names == list(tensors)  # file order = the order given
        for n, t in tensors.items():
            assert torch.equal(c.tensor(n), t) and c.tensor(n).dtype == t.dtype, n
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_failure_leaves_nothing_and_errors_name_the_tensor(tmp_path):
    path = str(tmp_path / "y.safetensors")
    old = write_state(path, [("w", torch.ones(2, 2))])

    def tensor(name):
        if name == "second":
            raise RuntimeError("device lost")
        return torch.zeros(3)
    with pytest.raises(RuntimeError, match="device lost"):
        write_safetensors(path, [("first", torch.float32, (3,)), ("second", torch.float32, (3,))], tensor)
    with pytest.raises(CheckpointError, match="tensor 'first' is torch.float32 \\(3,\\), expected torch.float32 \\(4,\\)"):
        write_safetensors(path, [("first", torch.float32, (4,))], tensor)
    with pytest.raises(CheckpointError, match="tensor 'z' has dtype torch.complex128"):
        write_state(path, [("z", torch.zeros(2, dtype=torch.complex128))])
    with pytest.raises(CheckpointError, match="tensor 'w' is given twice"):
        write_state(path, [("w", torch.zeros(1)), ("w", torch.zeros(1))])
    assert os.listdir(tmp_path) == ["y.safetensors"]  # no temp file left, the old file untouched
    with Checkpoint(old) as c:
        assert torch.equal(c.tensor("w"), torch.ones(2, 2))
