"""``bstore demo``: the main job on the built-in default, for newcomers.

It runs on a fresh state root of its own (never the user's), so it can be run again and
again. Today it shows the foundation: specs parsed and checked, the apps tree added to
the content-addressed store, verified and inspected; later layers extend it into the
full GitOps loop.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from bstore.cli.context import AppContext, pass_app

DEMO_SPECS: dict[str, str] = {
    "counter/app.config": """\
%% An Erlang rebar3 HTTP counter with a /health endpoint.
#{name => counter,
  version => <<"1.0.0">>,
  description => <<"HTTP counter using only OTP">>,
  source => #{type => git, url => <<"file:///srv/demo/counter.git">>, ref => <<"v1.0.0">>},
  env => #{port => 8081, greeting => "hello"},
  health => #{type => http, port => 8081, path => <<"/health">>},
  depends_on => []}.
""",
    "greeter/app.yaml": """\
# An Elixir mix app that depends on the counter.
name: greeter
version: "0.2.0"
source: {type: git, url: "file:///srv/demo/greeter.git", ref: main}
env: {mode: {$atom: friendly}}
depends_on: [counter]
""",
    "worker/app.json": """\
{"name": "worker", "version": "0.1.0",
 "source": {"type": "git", "url": "file:///srv/demo/worker.git", "ref": "main"},
 "isolation": "vm",
 "vm_config": {"memory_limit": 256, "scheduler_limit": 1}}
""",
}


def write_demo_apps(apps_dir: Path) -> None:
    """Write the demo's app specs (one per format) under ``apps_dir``."""
    for rel, text in DEMO_SPECS.items():
        path = apps_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where to put the demo (default: a new temporary directory).")
@pass_app
def demo(app: AppContext, workdir: Path | None) -> None:
    """Run bstore's main job on a built-in demo (its own state root)."""
    from bstore.specs.directory import load_apps_dir
    from bstore.store.local import LocalStore
    from bstore.store.verify import verify_store

    base = workdir or Path(tempfile.mkdtemp(prefix="bstore-demo-"))
    apps_dir = base / "apps"
    root = base / "state"
    write_demo_apps(apps_dir)
    app.log(f"demo: wrote 3 app specs (Erlang terms, YAML, JSON) to {apps_dir}")

    result = load_apps_dir(apps_dir)
    for problem in result.problems:
        app.log(f"  {problem}")
    for name, spec in sorted(result.specs.items()):
        deps = ", ".join(spec.depends_on) or "-"
        app.log(f"  {name} {spec.version}: {spec.isolation.value}, depends on {deps}")

    with LocalStore.open(root) as store:
        path = store.add_path(apps_dir, "demo-apps")
        again = store.add_path(apps_dir, "demo-apps")
        info = store.query_info(path)
        report = verify_store(store, check_contents=True)
    full = f"{root / 'store'}/{path}"
    app.log(f"demo: added the apps tree to the store as {full}")
    app.log(f"demo: adding it again gave the same path: {again == path}")
    app.log(f"demo: content id {info.mcid}, {info.nar_size} bytes")
    app.log(f"demo: store verify --check-contents: {'clean' if report.ok else 'PROBLEMS'}")
    app.emit(
        {"apps": sorted(result.specs), "store_path": full, "mcid": info.mcid,
         "verified": report.ok, "root": str(root)},
        human=f"bstore demo finished; state root {root}",
    )


COMMANDS: list[click.Command] = [demo]
