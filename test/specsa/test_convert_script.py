"""scripts/convert_smollm2.py: a missing package is a clear error before any download."""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_smollm2.py"


def test_missing_package_is_named_before_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)          # import gguf -> not found

    def no_download(*a, **k):
        raise AssertionError("downloaded before checking the packages")
    monkeypatch.setattr(subprocess, "run", no_download)
    monkeypatch.setattr(sys, "argv", ["convert_smollm2.py", "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    msg = str(e.value.code)
    assert "missing Python package(s): gguf" in msg and "accelerate" not in msg.split("(")[0]
    assert f"{sys.executable} -m pip install gguf" in msg
    assert not (tmp_path / "m").exists()


def test_base_install_has_the_conversion_packages():
    """gguf and accelerate are base dependencies: the script works right after `make demo`."""
    from importlib import metadata
    ns = runpy.run_path(str(SCRIPT))
    try:
        metadata.distribution("specsa")
    except metadata.PackageNotFoundError:
        pass        # the package is on PYTHONPATH without an install (the GPU machine's copy)
    else:
        assert ns["missing_packages"]() == []
    tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
    deps = tomllib.loads((SCRIPT.parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split("=")[0].split("<")[0].split(">")[0].strip() for d in deps}
    assert {"gguf", "accelerate"} <= names
