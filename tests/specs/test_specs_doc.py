"""The examples in docs/specs.md are valid specs and mean what the text says."""

from __future__ import annotations

import re
from pathlib import Path

from bstore.specs.directory import load_apps_dir
from bstore.specs.terms.model import Atom

_DOC = Path(__file__).resolve().parents[2] / "docs" / "specs.md"
_FILES = {"erlang": "app.config", "yaml": "app.yaml", "json": "app.json"}


def test_doc_examples_are_valid_specs(tmp_path: Path) -> None:
    blocks = re.findall(r"```(erlang|yaml|json)\n(.*?)```", _DOC.read_text(), re.S)
    specs = [(lang, text) for lang, text in blocks if re.search(r"\bname\b", text)]
    names = []
    for lang, text in specs:
        match = re.search(r'name(?: =>|"?:)\s*"?(\w+)', text)
        if match is None or "version" not in text:
            continue  # the JSON form at the end is output, not a spec
        name = match.group(1)
        names.append(name)
        app = tmp_path / name
        app.mkdir(exist_ok=True)
        (app / _FILES[lang]).write_text(text)
    assert sorted(set(names)) == ["db", "web"]
    # web has two examples (Erlang and YAML): app.config takes precedence, app.yaml is shadowed.
    result = load_apps_dir(tmp_path)
    assert result.errors == [], [str(p) for p in result.errors]
    assert sorted(result.specs) == ["db", "web"]
    web = result.specs["web"]
    assert web.env[Atom("greeting")] == list(b"hello")
    assert web.env[Atom("banner")] == b"hello"
    assert web.env[Atom("mode")] == Atom("prod")
    assert result.specs["db"].env[Atom("mode")] == Atom("primary")


def test_doc_yaml_example_alone(tmp_path: Path) -> None:
    text = re.findall(r"```yaml\n(.*?)```", _DOC.read_text(), re.S)[0]
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "app.yaml").write_text(text)
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "app.yaml").write_text("name: db\nversion: '1'\n")
    result = load_apps_dir(tmp_path)
    assert result.errors == []
    web = result.specs["web"]
    assert web.env[Atom("greeting")] == list(b"hello")
    assert web.env[Atom("pool")] == (10, 20)
    assert web.source.sha256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
