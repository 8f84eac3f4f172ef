"""What can be checked of the docker files without a Docker engine: they parse, and the
commands they run are the CLI's real commands."""
from __future__ import annotations

import re
import shlex

import yaml

from conftest import ROOT

DOCKER = ROOT / "docker"


def cmd_of(dockerfile: str) -> list[str]:
    text = (DOCKER / dockerfile).read_text()
    m = re.search(r'^CMD \["sh", "-c", "exec (.+)"\]$', text, re.M)
    assert m, f"{dockerfile}: no CMD"
    return shlex.split(m.group(1).replace("$HOSTNAME", "host"))


def test_compose_parses_with_gpu_reservations_and_password():
    d = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    gpu = d["services"]["gpu-worker"]
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"] and len(dev["device_ids"]) == 1
    assert "--requirepass" in d["services"]["redis"]["command"]
    assert "media:/data" in gpu["volumes"]
    assert "flower" in d["services"]


def test_image_commands_are_the_cli_commands():
    import cli

    parser = cli.make_argument_parser()
    for name, queues, device in (("Dockerfile.gpu", "gpu,cpu", "cuda:0"), ("Dockerfile.cpu", "cpu", "cpu")):
        argv = cmd_of(name)
        assert argv[0] == "facemend"
        args = parser.parse_args(argv[1:])
        assert (args.command, args.queues, args.device) == ("worker", queues, device)
    readme = (ROOT / "README.md").read_text()
    assert "facemend worker --queues gpu" in readme or "cli.py worker --queues gpu" in readme
