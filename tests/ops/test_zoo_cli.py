"""CLI and API errors of the zoo that need no model."""

from __future__ import annotations

import pytest

from bus.errors import ConfigError
from ops.zoo.__main__ import main
from ops.zoo.spec import full_spec, quick_spec


def test_info_without_zoo_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDREFINE_HOME", str(tmp_path))
    assert main(["info", "--quick", "--seed", "12345"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no quick zoo") and "\n" not in err


def test_load_without_build_is_clear(tmp_path, monkeypatch):
    from ops.zoo import load_zoo

    monkeypatch.setenv("FEDREFINE_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="python -m ops.zoo build --quick"):
        load_zoo(quick=True, seed=12345, build_if_missing=False)


def test_spec_keys():
    assert quick_spec(0).key() == quick_spec(0).key()
    assert quick_spec(0).key() != quick_spec(1).key() != full_spec(0).key()
    full = full_spec(0)
    assert full.receiver.arch == "qwen3" and full.receiver.share < 0.2
    assert len({m.arch for m in full.members}) >= 3 and len({m.vocab_size for m in full.members}) >= 4
