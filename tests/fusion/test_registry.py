"""Saving and loading fusers and gates by model pair."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bus.errors import FuserError
from fusion.fuser import FuserConfig, PairFuser
from fusion.gate import GateConfig, GateNetwork, OfferSummary, load_gate, save_gate
from fusion.registry import FORMAT_VERSION, FuserRegistry, load_fuser, save_fuser

R_FP, T_FP, OTHER_FP = "a" * 16, "b" * 16, "c" * 16
CFG = FuserConfig(4, 2, 8, 3, 1, 6, hidden=16)


def _fuser(seed: int = 0) -> PairFuser:
    torch.manual_seed(seed)
    return PairFuser(CFG).eval()


def test_round_trip_by_pair(tmp_path) -> None:
    reg = FuserRegistry(tmp_path)
    fuser = _fuser()
    with torch.no_grad():
        fuser.gate_logits[2] = -3.0
    reg.save(fuser, T_FP, R_FP, meta={"steps": 5})
    assert reg.has(T_FP, R_FP) and not reg.has(R_FP, T_FP)
    assert reg.pairs() == [(T_FP, R_FP)]
    loaded = reg.load(T_FP, R_FP)
    assert loaded.cfg == CFG and not loaded.training
    for (name, a), (_, b) in zip(fuser.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.open_layers() == [0, 1, 3]
    meta = reg.meta(T_FP, R_FP)
    assert meta["steps"] == 5
    params = sum(p.numel() for p in fuser.parameters())
    assert (meta["params"], meta["bytes_fp16"]) == (params, 2 * params)
    config = json.loads((reg.path_for(T_FP, R_FP) / "config.json").read_text())
    assert config["layer_map"] == fuser.layer_map and config["transmitter"] == T_FP and config["receiver"] == R_FP


def test_wrong_pair_missing_corrupt_and_version_are_clear_errors(tmp_path) -> None:
    reg = FuserRegistry(tmp_path)
    path = reg.save(_fuser(), T_FP, R_FP)
    with pytest.raises(FuserError, match="wrong model pair"):
        load_fuser(path, transmitter_fp=OTHER_FP, receiver_fp=R_FP)
    with pytest.raises(FuserError, match="wrong model pair"):
        load_fuser(path, receiver_fp=OTHER_FP)
    with pytest.raises(FuserError, match="no fuser for transmitter"):
        reg.load(OTHER_FP, R_FP)
    # A file for another pair placed under this pair's name is still refused.
    save_fuser(_fuser(), reg.path_for(OTHER_FP, R_FP), T_FP, R_FP)
    with pytest.raises(FuserError, match="wrong model pair"):
        reg.load(OTHER_FP, R_FP)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(FuserError, match="corrupt"):
        reg.load(T_FP, R_FP)
    reg.save(_fuser(), T_FP, R_FP)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "version": FORMAT_VERSION + 1}))
    with pytest.raises(FuserError, match="version"):
        reg.load(T_FP, R_FP)
    (path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(FuserError, match="not a fedrefine.fuser"):
        reg.load(T_FP, R_FP)
    (path / "config.json").write_text("{not json")
    with pytest.raises(FuserError, match="not readable JSON"):
        reg.load(T_FP, R_FP)
    shutil.rmtree(path)
    torch.save({"format": "fedrefine.fuser", "version": 1}, path)  # a version-1 file where a directory belongs
    with pytest.raises(FuserError, match="is a file"):
        reg.load(T_FP, R_FP)
    with pytest.raises(FuserError, match="fingerprint"):
        reg.path_for("../etc", R_FP)


def test_gate_round_trip_and_wrong_receiver(tmp_path) -> None:
    torch.manual_seed(0)
    gate = GateNetwork(GateConfig(hidden=8), {T_FP: (0.0, 0.5, 1.0)}).eval()
    path = save_gate(gate, FuserRegistry(tmp_path).gate_path(R_FP), R_FP)
    loaded = load_gate(path, R_FP)
    offer = OfferSummary(
        fingerprint=T_FP, num_layers=3, num_tokens=20, p_none=0.1, p_top=0.8, entropy=0.5, summary=(0.1,) * 8
    )
    assert gate.score([offer]) == loaded.score([offer])
    with pytest.raises(FuserError, match="gate for receiver"):
        load_gate(path, OTHER_FP)
