"""Suite-wide guard: an Erlang VM that a test starts without a working directory of its
own (``erl -eval ...`` helpers, escripts) writes any crash dump into the session's temp
dir, never into the repository (a stray ``erl_crash.dump`` in the repo root). Nodes and
VMs bstore starts set their own (``<node dir>/erl_crash.dump``, see hostnode.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _erl_crash_dumps_out_of_the_repo(tmp_path_factory: pytest.TempPathFactory
                                     ) -> Iterator[None]:
    old = os.environ.get("ERL_CRASH_DUMP")
    os.environ["ERL_CRASH_DUMP"] = str(tmp_path_factory.mktemp("erl-crash") / "erl_crash.dump")
    yield
    if old is None:
        os.environ.pop("ERL_CRASH_DUMP", None)
    else:
        os.environ["ERL_CRASH_DUMP"] = old
