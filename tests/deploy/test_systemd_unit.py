"""``deploy/dptrain-coordinator.service``: the coordinator as an unprivileged user (whose
permissions every job's code gets on the workers it starts), with a command line ``dptrain
serve`` accepts."""

from __future__ import annotations

import shlex

from repo import REPO

from dptrain.coordinator.cli import build_parser

UNIT = REPO / "deploy" / "dptrain-coordinator.service"


def _service() -> dict[str, str]:
    text = UNIT.read_text().replace("\\\n", " ")
    section, out = None, {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, value)
    return out


def test_the_unit_runs_the_coordinator_as_an_unprivileged_user():
    service = _service()
    assert service["User"] == "dptrain" and service["Group"] == "dptrain"
    assert service["NoNewPrivileges"] == "true"


def test_the_units_command_is_one_dptrain_serve_accepts():
    argv = shlex.split(_service()["ExecStart"])
    assert argv[0].endswith("/dptrain") and argv[1] == "serve"
    args = build_parser().parse_args(argv[1:])
    assert args.state_dir == "/var/lib/dptrain" and args.allow_module == []  # none by default
