"""App specs: Erlang-term, YAML and JSON spec files read into validated :class:`AppSpec` values.

``bstore.specs.directory.load_apps_dir`` reads a whole apps directory,
``bstore.specs.schema.load_spec`` / ``load_spec_file`` one file; see docs/specs.md.
"""

# The term package must initialise before ``located`` (which it imports and which
# imports ``terms.model``); importing it first here makes every entry point safe.
from bstore.specs import terms as terms
