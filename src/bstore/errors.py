"""The one error tree of bstore.

Every failure a user can cause or meet is a :class:`BstoreError`: a short ``message``
that quotes the offending value and names the file, URL or store involved, and an
optional ``hint`` that says what to do next. Subclasses are declared next to the
concept that raises them; foreign exceptions (``OSError``, ``sqlite3.Error``,
``httpx.HTTPError``, ``pygit2.GitError``, ``subprocess`` failures) are mapped into
this tree at the boundary with ``raise ... from exc``. The CLI catches only
``BstoreError``: anything else reaching it is a bug.

::

    BstoreError
    ├── StoreError              (bstore.store)      store layout, database, locking
    │   ├── InvalidStorePath                          a name or digest that is not valid
    │   ├── InvalidTreeError                          a tree that cannot be added
    │   ├── ArchiveError                              a malformed or lying export stream
    │   ├── StoreLockedError                          database busy beyond the retry bound
    │   └── PathNotValidError                         a path that is not registered
    └── SpecError               (bstore.specs)      app specs and Erlang terms
        └── TermSyntaxError                           positioned Erlang-term parse error
"""

from __future__ import annotations


class BstoreError(Exception):
    """Base of every error bstore reports to a user.

    ``message`` says what went wrong, quoting the value and naming its source;
    ``hint`` (optional) says what the user can do about it.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str | None]:
        """The error as a JSON-ready mapping (for ``--json`` output)."""
        return {"error": type(self).__name__, "message": self.message, "hint": self.hint}
