"""Every command's surface: help before torch, one-line errors with exit 2, --nats forms, settings file, paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from agents.config import GateAgentConfig, ReceiverConfig, TransmitterConfig, build_parser, parse_config
from bus.cli import nats_from_env, nats_servers
from bus.errors import ConfigError
from ops import fedrefine
from ops.zoo.__main__ import paths_text, zoo_paths

ROOT = Path(__file__).resolve().parents[2]
# every command, as `python -m MODULE` takes it (a benchmark's flags need its name first)
COMMANDS = {
    "agents.transmitter": [],
    "agents.receiver": [],
    "agents.gate": [],
    "agents.rephraser": [],
    "fusion.train": ["--receiver", "r", "--transmitter", "t", "--data", "d", "--out", "o"],
    "ops.ask": [],
    "ops.server": [],
    "ops.demo": [],
    "ops.zoo": ["info"],
    "ops.real": ["info"],
    "ops.bench": ["codec"],
    "ops.report": [],
    "ops.creds": ["list"],
    "ops.watch": [],
    "ops.gateway": [],
    "ops.fedrefine": ["gate"],
}

HELP_PROBE = """
import runpy, sys
pulled = []
for module, head in {commands!r}.items():
    sys.argv = [module, *head, "--help"]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        assert exc.code in (0, None), (module, exc.code)
    if "torch" in sys.modules or "transformers" in sys.modules:
        pulled.append(module)
        break
print(repr(pulled))
"""


def test_help_of_every_command_imports_no_torch() -> None:
    """--help answers from the flags alone: no module on the way imports torch or transformers."""
    # a benchmark's own flags come from its module, which may import torch: its list answers without it
    code = HELP_PROBE.format(commands={**COMMANDS, "ops.bench": []})
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"imported torch: {out.stdout.strip()}"


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_a_bad_flag_is_one_line_and_status_2(module: str) -> None:
    argv = [sys.executable, "-m", module, *COMMANDS[module], "--no-such-flag"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--no-such-flag" in lines[0], out.stderr


@pytest.mark.parametrize(
    ("text", "servers"),
    [
        ("127.0.0.1:4333", "nats://127.0.0.1:4333"),
        ("localhost", "nats://localhost:4222"),
        ("tls://a:1, b:2,nats://c", "tls://a:1,nats://b:2,nats://c"),
        ("nats://user:pw@host:4223", "nats://user:pw@host:4223"),
        ("ws://h:8080/path", "ws://h:8080/path"),
    ],
)
def test_nats_takes_what_nats_py_takes(text: str, servers: str) -> None:
    assert nats_servers(text) == servers


@pytest.mark.parametrize(("text", "needle"), [("ftp://h:1", "scheme"), ("h:0", "port"), ("a:1,,b:2", "empty"),
                                              ("nats://:4222", "no host")])  # fmt: skip
def test_bad_nats_servers_are_one_line(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        nats_servers(text)


def test_nats_is_the_same_in_every_command() -> None:
    env = {"NATS_URL": "h1:5000,h2:5001"}
    gate = parse_config(GateAgentConfig, "gate", ["--insecure"], env=env)
    assert gate.nats == nats_servers(nats_from_env(env)) == "nats://h1:5000,nats://h2:5001"
    from ops.ask import build_parser as ask_parser
    from ops.watch import build_parser as watch_parser

    for parser in (ask_parser(), watch_parser()):
        assert parser.parse_args(["--nats", "h3:4000"]).nats == "nats://h3:4000"


def test_settings_file_under_environment_under_flags(tmp_path: Path) -> None:
    conf = tmp_path / "fed.toml"
    conf.write_text(
        'nats = "10.1.1.1:4000"\nlink-mbps = 3.0\nmodel = "m"\n[transmitter]\ntop_k = 7\n[gate]\npolicy = "x"\n'
    )
    cfg = parse_config(TransmitterConfig, "transmitter", ["--config", str(conf)], env={})
    assert (cfg.nats, cfg.link_mbps, cfg.top_k, cfg.model) == ("nats://10.1.1.1:4000", 3.0, 7, "m")
    env = {"FEDREFINE_LINK_MBPS": "5", "FEDREFINE_CONFIG": str(conf)}
    cfg = parse_config(TransmitterConfig, "transmitter", [], env=env)
    assert (cfg.link_mbps, cfg.top_k) == (5.0, 7)
    cfg = parse_config(TransmitterConfig, "transmitter", ["--link-mbps", "9", "--config", str(conf)], env=env)
    assert cfg.link_mbps == 9.0
    gate = parse_config(GateAgentConfig, "gate", ["--config", str(conf), "--policy", "keep-all"], env={})
    assert gate.nats == "nats://10.1.1.1:4000"  # the transmitters' keys at the top are not the gate's business


@pytest.mark.parametrize(
    ("text", "needle"),
    [("heartbeat_s = -1\n", "--config .*heartbeat_s"), ("colour = 1\n", "'colour' is no agent's setting"),
     ("[gate]\nlink_mbps = 1\n", "'link_mbps' is not a gate setting"),
     ("[bogus]\nx = 1\n", r"unknown table \[bogus\]"), ("nats = \n", "not TOML")],
)  # fmt: skip
def test_a_bad_settings_file_says_where(tmp_path: Path, text: str, needle: str) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        parse_config(GateAgentConfig, "gate", ["--config", str(conf), "--insecure"], env={})
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config(GateAgentConfig, "gate", ["--config", str(tmp_path / "none.toml")], env={})


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="^FEDREFINE_HEARTBEAT_S: "):
        parse_config(GateAgentConfig, "gate", [], env={"FEDREFINE_HEARTBEAT_S": "soon"})


def test_help_is_grouped_with_plain_defaults_and_choices() -> None:
    text = build_parser(ReceiverConfig, "python -m agents.receiver", "").format_help()
    titles = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert {t.split(" (")[0].rstrip(":") for t in titles} >= {"connection", "model", "role"}
    assert "{float32,bfloat16,float16}" in text and "default: float32" in text and "'float32'" not in text
    gate_help = build_parser(GateAgentConfig, "python -m agents.gate", "").format_help()
    assert "bandwidth:" in gate_help and "deadline-aware" in gate_help


def test_fusers_that_do_not_exist_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--fusers: no fusers directory"):
        parse_config(ReceiverConfig, "receiver", ["--model", "m", "--fusers", str(tmp_path / "no")], env={})
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"\(it is a file\)"):
        parse_config(ReceiverConfig, "receiver", ["--model", "m", "--fusers", str(tmp_path / "file")], env={})
    ok = parse_config(ReceiverConfig, "receiver", ["--model", "m", "--fusers", str(tmp_path)], env={})
    assert ok.fusers == str(tmp_path)


def test_fedrefine_runs_the_named_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert fedrefine.main(["nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown command 'nope'")
    assert fedrefine.main(["gate", "--help"]) == 0
    assert "python -m agents.gate" in capsys.readouterr().out
    assert fedrefine.main(["--help"]) == 0
    assert set(fedrefine.COMMANDS) <= set(capsys.readouterr().out.split())


def test_zoo_info_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "zoo"
    (root / "models" / "rx").mkdir(parents=True)
    (root / "fusers" / "fuser-aaaa-to-bbbb").mkdir(parents=True)
    (root / "fusers" / "gate-bbbb").mkdir()
    models = [SimpleNamespace(name="rx", path="models/rx", fingerprint="bbbb"),
              SimpleNamespace(name="tx", path="models/tx", fingerprint="aaaa")]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    paths = zoo_paths(Path("zoo"), SimpleNamespace(models=models))
    assert paths["fusers"] == {"tx -> rx": str(root / "fusers" / "fuser-aaaa-to-bbbb")}
    assert paths["gates"] == {"rx": str(root / "fusers" / "gate-bbbb")}
    assert paths["models"]["rx"] == str(root / "models" / "rx")
    everything = [paths["root"], *paths["models"].values(), *paths["fusers"].values(), *paths["gates"].values()]
    assert all(Path(p).is_absolute() for p in everything)
    assert all(p in paths_text(paths) for p in everything)
    json.dumps(paths)


def test_the_demo_translates_only_real_models(capsys: pytest.CaptureFixture[str]) -> None:
    from ops.demo import main

    assert main(["--tiny", "--mode", "translate", "--questions", "1"]) == 2
    assert "--mode translate needs --real" in capsys.readouterr().err
