"""The one hostfile parser, shared by ``dptrain run`` and ``dptrain serve``: hand-written files
against the placements they mean, and one error line per mistake naming file and line."""

import pytest

from dptrain.worker.hostfile import (
    HostfileError,
    hosts_argument,
    is_local,
    parse_hostfile,
    read_hostfile,
)


def test_parse_hostfile():
    text = """
        # rack 1
        node1:8          # MPICH style
        node2 slots=4    # Open MPI style

        node-3.example.org
    """
    assert parse_hostfile(text) == (("node1", 8), ("node2", 4), ("node-3.example.org", 1))


@pytest.mark.parametrize("text, message", [
    ("a:2\nb:zero\n", "hosts.txt:2: slots: must be an integer >= 1, got 'zero'"),
    ("a:0\n", "hosts.txt:1: slots: must be an integer >= 1, got '0'"),
    ("a:\n", "hosts.txt:1: slots: must be an integer >= 1, got ''"),
    ("\n\na slots=-2\n", "hosts.txt:3: slots: must be an integer >= 1, got '-2'"),
    ("a:2 extra\n", "hosts.txt:1: expected 'host', 'host:slots' or 'host slots=N', got"),
    ("a:2:ib0\n", "hosts.txt:1: expected 'host', 'host:slots' or 'host slots=N'"),
    ("-bad:2\n", "hosts.txt:1: host: must be letters, digits"),
    ("a:2\nb:1\na:4\n", "hosts.txt:3: host 'a' is listed again (first on line 1)"),
    ("# nothing\n\n", "hosts.txt: lists no hosts"),
])
def test_hostfile_errors_name_the_line(text, message):
    with pytest.raises(HostfileError) as e:
        parse_hostfile(text, "hosts.txt")
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_read_hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("n1 slots=3\nn2\n")
    assert read_hostfile(path) == (("n1", 3), ("n2", 1))
    with pytest.raises(HostfileError, match=f"^{tmp_path / 'missing'}: cannot read the hostfile"):
        read_hostfile(tmp_path / "missing")


def test_hydra_form_and_locality():
    assert hosts_argument((("node1", 4), ("node2", 2))) == "node1:4,node2:2"
    assert is_local((("localhost", 4),)) and is_local((("127.0.0.1", 1), ("::1", 1)))
    assert not is_local((("localhost", 2), ("node2", 2)))
