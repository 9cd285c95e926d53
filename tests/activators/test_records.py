"""The node records (``apps.sqlite``): one row per app bstore started in a node, shared
between bstore processes, taking over an older bstore's ``apps.json``."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bstore.activators.records import ManagedApp, ManagedRecords, RecordsError
from bstore.specs.model import Isolation

A1 = ManagedApp("alpha", "1.0.0", "aaaa-alpha-1.0.0", Isolation.EMBEDDED)
A2 = ManagedApp("alpha", "2.0.0", "bbbb-alpha-2.0.0", Isolation.EMBEDDED)
B1 = ManagedApp("beta", "1.0.0", "cccc-beta-1.0.0", Isolation.VM)


def test_write_update_forget(tmp_path: Path) -> None:
    records = ManagedRecords(tmp_path / "node" / "apps.sqlite")
    assert records.read() == {}
    records.write({"alpha": A1, "beta": B1})
    assert records.read() == {"alpha": A1, "beta": B1}
    records.update("alpha", A2)
    assert records.get("alpha") == A2 and records.get("beta") == B1
    records.update("beta", None)
    assert records.read() == {"alpha": A2}
    records.update("gamma", None)  # nothing recorded: nothing to do
    # what the caller gets is its own copy
    records.read().clear()
    assert records.read() == {"alpha": A2}
    records.write({})
    assert records.read() == {}


def test_another_process_sees_every_change(tmp_path: Path) -> None:
    path = tmp_path / "apps.sqlite"
    ours = ManagedRecords(path)
    ours.write({"alpha": A1})
    assert ours.read() == {"alpha": A1}  # now cached
    script = (
        "import sys\n"
        "from bstore.activators.records import ManagedApp, ManagedRecords\n"
        "from bstore.specs.model import Isolation\n"
        "r = ManagedRecords(__import__('pathlib').Path(sys.argv[1]))\n"
        "assert r.get('alpha').version == '1.0.0'\n"
        "r.update('alpha', ManagedApp('alpha', '2.0.0', 'bbbb-alpha-2.0.0',"
        " Isolation.EMBEDDED))\n"
        "r.update('beta', ManagedApp('beta', '1.0.0', 'cccc-beta-1.0.0', Isolation.VM))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    assert ours.read() == {"alpha": A2, "beta": B1}
    ours.update("beta", None)
    again = ManagedRecords(path)
    assert again.read() == {"alpha": A2}


def test_takes_over_the_apps_json_of_an_older_bstore(tmp_path: Path) -> None:
    legacy = tmp_path / "apps.json"
    legacy.write_text(json.dumps({"alpha": {"version": "1.0.0", "output": A1.output,
                                            "isolation": "embedded"}}))
    records = ManagedRecords(tmp_path / "apps.sqlite")
    assert records.read() == {"alpha": A1}
    assert not legacy.exists()
    assert ManagedRecords(tmp_path / "apps.sqlite").read() == {"alpha": A1}


def test_unreadable_apps_json_records_nothing(tmp_path: Path) -> None:
    (tmp_path / "apps.json").write_text("{not json")
    records = ManagedRecords(tmp_path / "apps.sqlite")
    assert records.read() == {}
    assert not (tmp_path / "apps.json").exists()


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "apps.sqlite"
    path.write_bytes(b"this is not an SQLite database, just text" * 100)
    with pytest.raises(RecordsError) as info:
        ManagedRecords(path).read()
    assert info.value.message == f"cannot open the node records {path}: file is not a database"
    assert "bstore node stop" in (info.value.hint or "")
    assert path.read_bytes().startswith(b"this is not")  # left as it was


def test_a_row_with_an_unknown_isolation(tmp_path: Path) -> None:
    path = tmp_path / "apps.sqlite"
    ManagedRecords(path).write({"alpha": A1})
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE apps SET isolation = 'container'")
    with pytest.raises(RecordsError, match="'container' is not a valid Isolation") as info:
        ManagedRecords(path).read()
    assert str(path) in info.value.message and "newer bstore" in (info.value.hint or "")
