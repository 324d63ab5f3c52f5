"""mlip_fed/io.py: durable writes leave the old file or the new one, never half of one, and no stray temp file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mlip_fed import io as mio


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_round_trip_and_make_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    assert mio.atomic_write_bytes(target, b"\x00\x01") == target and target.read_bytes() == b"\x00\x01"
    mio.atomic_write_text(target, "é\n")
    assert target.read_bytes() == "é\n".encode()
    assert _leftovers(target.parent) == []


def test_json_is_sorted_and_converts_paths_tensors_and_arrays(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    mio.atomic_write_json(target, {"b": Path("x/y"), "a": torch.tensor(1.5), "c": np.arange(3), "d": torch.ones(2)})
    text = target.read_text(encoding="utf-8")
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": 1.5, "b": "x/y", "c": [0, 1, 2], "d": [1.0, 1.0]}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        mio.atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and _leftovers(tmp_path) == []


def test_a_crash_before_the_rename_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ckpt.pt"
    mio.atomic_torch_save(target, {"w": torch.zeros(3)})

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(mio.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        mio.atomic_torch_save(target, {"w": torch.ones(3)})
    monkeypatch.undo()
    assert torch.equal(torch.load(target)["w"], torch.zeros(3))  # the old checkpoint, whole
    assert _leftovers(tmp_path) == []


def test_a_failing_writer_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "x.pt"
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save, whatever it raises
        mio.atomic_torch_save(target, {"f": lambda: None})
    assert not target.exists() and _leftovers(tmp_path) == []


def test_append_jsonl_appends_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "m.jsonl"
    mio.append_jsonl(log, {"step": 1, "loss": torch.tensor(0.5)})
    mio.append_jsonl(log, {"step": 2, "path": Path("p")})
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"loss": 0.5, "step": 1},
        {"path": "p", "step": 2},
    ]
    assert os.path.getsize(log) == len(log.read_bytes())
