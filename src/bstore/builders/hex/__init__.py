"""The Hex package fetcher: registry v2 client, tarballs, versions and resolution.

Modules, bottom to top: :mod:`.protobuf` (wire format of the registry messages),
:mod:`.versions` (SemVer and Hex/Elixir requirements), :mod:`.repos` (configured
repositories and their public keys), :mod:`.registry` (signed ``/packages/<name>``
entries), :mod:`.tarball` (``/tarballs/<name>-<version>.tar``), :mod:`.locks`
(``rebar.lock`` / ``mix.lock``) and :mod:`.resolve` (choosing versions).
"""
