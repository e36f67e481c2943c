"""statefile: atomic, durable JSON state; loud about corruption."""

import json
import os
import stat

import pytest

from pufflet.priv import statefile
from pufflet.priv.statefile import StateError


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_round_trip_and_mode(tmp_path):
    p = str(tmp_path / "state.json")
    statefile.write_json(p, {"b": [1, 2], "a": "x"})
    assert statefile.read_json(p, None) == {"b": [1, 2], "a": "x"}
    st = os.lstat(p)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    statefile.write_json(p, [3])
    assert statefile.read_json(p, None) == [3]
    assert os.listdir(tmp_path) == ["state.json"]     # no temp files left


def test_missing_file_gives_default(tmp_path):
    assert statefile.read_json(str(tmp_path / "none.json"), {"x": 1}) == {"x": 1}


@pytest.mark.parametrize("content", [b"{\"a\": ", b"", b"\xff\xfe", b"[1] [2]"])
def test_corrupt_file_is_an_error_naming_it(tmp_path, content):
    p = tmp_path / "state.json"
    p.write_bytes(content)
    with pytest.raises(StateError, match=str(p) + ".*corrupt"):
        statefile.read_json(str(p), {})
    assert p.read_bytes() == content        # left for the admin to look at


def test_symlink_is_refused(tmp_path):
    (tmp_path / "real.json").write_text("{}")
    os.symlink("real.json", tmp_path / "state.json")
    with pytest.raises(StateError, match="state.json"):
        statefile.read_json(str(tmp_path / "state.json"), {})


def test_failed_write_keeps_old_state(tmp_path):
    p = str(tmp_path / "state.json")
    statefile.write_json(p, {"ok": 1})
    with pytest.raises(StateError, match="cannot encode"):
        statefile.write_json(p, {"bad": object()})
    with pytest.raises(StateError, match="cannot encode"):
        statefile.write_json(p, {"nan": float("nan")})
    assert statefile.read_json(p, None) == {"ok": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_leftover_temp_files_are_swept(tmp_path):
    p = str(tmp_path / "state.json")
    statefile.write_json(p, {"v": 1})
    dead = tmp_path / f".state.json.tmp-{dead_pid()}-0000"
    dead.write_text('{"v": 2, half')
    live = tmp_path / ".state.json.tmp-1-0000"     # init: alive, not ours
    live.write_text("{")
    other = tmp_path / ".other.json.tmp-99999999-0000"
    other.write_text("{")
    assert statefile.read_json(p, None) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".state.json.tmp-1-0000", ".other.json.tmp-99999999-0000", "state.json"])


def test_written_file_is_plain_json(tmp_path):
    p = tmp_path / "state.json"
    statefile.write_json(str(p), {"pods": {"a": 1}})
    assert json.loads(p.read_text()) == {"pods": {"a": 1}}
    assert p.read_text().endswith("\n")


def test_written_compact_on_one_line(tmp_path):
    # Compact is what lets json use its C encoder (see write_json): the
    # pod table is rewritten whole at every container start and exit.
    p = tmp_path / "state.json"
    statefile.write_json(str(p), {"pods": {"b": [1, 2], "a": {"x": None}}})
    assert p.read_text() == '{"pods":{"a":{"x":null},"b":[1,2]}}\n'
