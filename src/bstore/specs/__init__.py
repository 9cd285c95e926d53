"""App specs: Erlang-term, YAML and JSON spec files read into validated :class:`AppSpec` values.

``bstore.specs.directory.load_apps_dir`` reads a whole apps directory,
``bstore.specs.loader.load_spec`` / ``load_spec_file`` one file; see docs/specs.md.
"""
