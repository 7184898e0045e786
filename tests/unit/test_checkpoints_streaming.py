"""Models written and read 4 MiB at a time: the files are plain safetensors, hashed as
written, and adding a file into flat sums equals adding the loaded tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedcollab.coordinator._checkpoints import (
    add_file_into,
    file_sha256,
    stored_tensors,
    write_atomic,
    write_streaming,
)

TENSORS = {
    "layer.weight": torch.randn(33, 17),
    "big": torch.randn(1_500_001),  # spans several 4 MiB blocks
    "half": torch.randn(1_111).to(torch.bfloat16),
    "double": torch.randn(5, dtype=torch.float64),
    "empty": torch.zeros(0),
}


def _flat(t: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.dtype, tuple[int, ...]]]:
    return {k: (v.reshape(-1).to(torch.float64), v.dtype, tuple(v.shape)) for k, v in t.items()}


def test_a_streamed_file_is_safetensors_with_its_sha256(tmp_path: Path) -> None:
    model = write_streaming(_flat(TENSORS), folder=tmp_path, version=7)
    assert model.path.name.startswith("v000007-") and model.sha256 == file_sha256(model.path)
    back = load_file(str(model.path))
    assert set(back) == set(TENSORS)
    for name, t in TENSORS.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    assert not list(tmp_path.glob("*.tmp"))


def test_headers_name_the_tensors_of_files_written_either_way(tmp_path: Path) -> None:
    for model in (write_atomic(TENSORS, folder=tmp_path, version=1),
                  write_streaming(_flat(TENSORS), folder=tmp_path, version=2)):
        stored = stored_tensors(model.path)
        assert [t.name for t in stored] == sorted(TENSORS)
        assert {t.name: (t.dtype, t.shape) for t in stored} == {k: (v.dtype, tuple(v.shape)) for k, v in
                                                                 TENSORS.items()}


def test_adding_a_file_into_sums_equals_adding_its_tensors(tmp_path: Path) -> None:
    model = write_atomic(TENSORS, folder=tmp_path, version=1)
    sums = {k: torch.ones(v.numel(), dtype=torch.float64 if v.dtype == torch.float64 else torch.float32)
            for k, v in TENSORS.items()}
    add_file_into(model.path, sums)
    for name, t in TENSORS.items():
        torch.testing.assert_close(sums[name], 1 + t.reshape(-1).to(sums[name].dtype), rtol=0, atol=0)
    with pytest.raises(ValueError, match="elements"):
        add_file_into(model.path, {**sums, "big": torch.zeros(3)})


def test_a_file_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        stored_tensors(bad)
