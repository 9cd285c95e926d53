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
    ├── store      StoreError (ArchiveError, PathMetaError, CacheFormatError,
    │              PathNotValidError, StoreLockedError), InvalidStorePath,
    │              InvalidTreeError, CacheError (CacheMissing, CacheUnavailable,
    │              CacheTooLarge, CacheAuthError, BlobError), SigningKeyError,
    │              SignatureError, MeshError
    ├── specs      SpecError, InvalidSpec, TermSyntaxError, TermReadError,
    │              TermFormatError
    ├── builders   SourceError (MeshUnavailable), GitFetchError, HexError (RegistryError,
    │              TarballError, VersionError, ResolutionError, LockError,
    │              ProtobufError), DownloadError (ChecksumMismatch, DownloadTooLarge),
    │              UnsafeArchiveError, BuildError (BuildSystemNotDetected),
    │              RealiseError (DerivationFailed), InvalidDerivation, CycleError,
    │              ToolchainError, DeclaredDepsError
    ├── generations GenerationError, ManifestError, ProfileError, JournalError
    ├── activators ActivatorError, ActivationFailed, AgentError (AgentUnavailable,
    │              AgentProtocolError, AgentOpError (LingeringProcessesError)),
    │              EtfError, HostNodeError, VmError, CookieError, CgroupError,
    │              SwitchAborted
    └── gitops     ConfigError, RepoSyncError (RepoUnreachableError,
                   CommitRefusedError, SignatureError, UnsafeCheckoutError),
                   ReconcileError (ReconcileBusy), DaemonError, ApiError (HTTP
                   status errors), StatusError, EventError

Each class lives next to the concept that raises it; this drawing is the index.
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
