"""The demo's app specs and sources: every spec is valid in its format and says what
the demo relies on (ports, versions, isolation); bad parameters are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from bstore.demo import templates as t
from bstore.specs.directory import load_apps_dir
from bstore.specs.model import HealthType, Isolation


def write_specs(apps: Path, release: t.CounterVersion, ports: t.Ports) -> None:
    files = {"counter/app.config": t.counter_spec("file:///src/counter", release, ports),
             "hello_ex/app.yaml": t.hello_spec("file:///src/hello_ex"),
             "worker/app.json": t.worker_spec("file:///src/worker", ports)}
    for rel, text in files.items():
        (apps / rel).parent.mkdir(parents=True)
        (apps / rel).write_text(text)


@pytest.mark.parametrize("release", [t.COUNTER_V1, t.COUNTER_V2, t.COUNTER_BROKEN])
def test_the_three_specs_parse_with_the_ports_and_versions(tmp_path: Path,
                                                           release: t.CounterVersion) -> None:
    ports = t.Ports(counter=40001, worker=40002)
    write_specs(tmp_path, release, ports)
    result = load_apps_dir(tmp_path)
    assert [p for p in result.problems if p.severity.value == "error"] == []
    counter, hello, worker = (result.specs[n] for n in ("counter", "hello_ex", "worker"))
    assert counter.version == release.version
    assert counter.source.ref == f"v{release.version}"
    assert counter.health is not None and counter.health.type is HealthType.HTTP
    assert (counter.health.port, counter.health.path) == (40001, "/health")
    assert hello.depends_on == ("counter",)
    assert hello.health is not None and hello.health.module == "hello_ex_health"
    assert worker.isolation is Isolation.VM
    assert worker.vm_config is not None
    assert (worker.vm_config.memory_limit, worker.vm_config.scheduler_limit) == (
        t.WORKER_MEMORY_MB, t.WORKER_SCHEDULERS)
    assert worker.health is not None and worker.health.port == 40002


def test_only_the_broken_release_answers_500_on_health() -> None:
    good = t.counter_sources(t.COUNTER_V2)["src/counter_http.erl"]
    bad = t.counter_sources(t.COUNTER_BROKEN)["src/counter_http.erl"]
    assert '-define(HEALTH, "200 OK")' in good
    assert '-define(HEALTH, "500 Internal Server Error")' in bad
    assert '{vsn, "1.2.0"}' in t.counter_sources(t.COUNTER_BROKEN)["src/counter.app.src"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"version": '1"0'}, "cannot be put in an Erlang string literal"),
    ({"greeting": "a\\b"}, "cannot be put in an Erlang string literal"),
    ({"greeting": "two\nlines"}, "cannot be put in an Erlang string literal"),
])
def test_counter_versions_refuse_text_that_breaks_the_source(kwargs: dict[str, str],
                                                             message: str) -> None:
    args = {"version": "1.0.0", "greeting": "hi", **kwargs}
    with pytest.raises(ValueError, match=message):
        t.CounterVersion(**args)


@pytest.mark.parametrize(("counter", "worker", "message"), [
    (80, 40000, "port 80 is outside 1024-65535"),
    (40000, 70000, "port 70000 is outside 1024-65535"),
    (40000, 40000, "the same port 40000"),
])
def test_ports_are_checked(counter: int, worker: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        t.Ports(counter=counter, worker=worker)


def test_config_toml_quotes_paths_and_sets_the_activator(tmp_path: Path) -> None:
    from bstore.gitops.config import load_config

    url = (tmp_path / 'we"ird dir').as_uri()
    path = tmp_path / "bstore.toml"
    path.write_text(t.config_toml(url, "demo-abc123"))
    config = load_config(path, env={})
    assert (config.repo_url, config.profile, config.activator) == (url, "demo-abc123",
                                                                   "embedded")
    assert config.reconcile_interval == 5.0
