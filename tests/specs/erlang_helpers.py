"""Real-``erl`` oracles for the Erlang-term tests.

* :func:`to_etf` encodes our terms in the External Term Format, so Erlang can compare
  them with ``=:=`` without going through our printer.
* :func:`consult_batch` runs ONE ``erl`` for many files (a VM takes ~1 s to start):
  for each task it runs ``file:consult/1`` on the source and reports whether consult
  succeeded, whether the result ``=:=`` our parse (given as ETF), and whether it ``=:=``
  what consult reads from our printed file.
* :class:`ErlangPort` is one long-lived ``erl`` answering line-based requests, for
  hypothesis: it reads our printed text, and prints terms with ``~tp`` / ``~tw``.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bstore.specs.terms import Atom, ImproperList, Term

ERL = shutil.which("erl")


def to_etf(term: Term) -> bytes:
    """``term_to_binary(Term)`` for our model."""
    return b"\x83" + _etf(term)


def _etf(term: Term) -> bytes:
    if isinstance(term, Atom):
        name = term.name.encode("utf-8")
        if len(name) < 256:
            return bytes([119, len(name)]) + name
        return struct.pack(">BH", 118, len(name)) + name
    if isinstance(term, bool):
        raise TypeError("bool is not a term")
    if isinstance(term, int):
        if 0 <= term < 256:
            return bytes([97, term])
        if -(2**31) <= term < 2**31:
            return struct.pack(">Bi", 98, term)
        magnitude = abs(term)
        digits = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "little")
        sign = 1 if term < 0 else 0
        if len(digits) < 256:
            return bytes([110, len(digits), sign]) + digits
        return struct.pack(">BIB", 111, len(digits), sign) + digits
    if isinstance(term, float):
        return struct.pack(">Bd", 70, term)
    if isinstance(term, bytes):
        return struct.pack(">BI", 109, len(term)) + term
    if isinstance(term, tuple):
        head = bytes([104, len(term)]) if len(term) < 256 else struct.pack(">BI", 105, len(term))
        return head + b"".join(_etf(item) for item in term)
    if isinstance(term, list):
        if not term:
            return b"\x6a"
        return struct.pack(">BI", 108, len(term)) + b"".join(_etf(i) for i in term) + b"\x6a"
    if isinstance(term, ImproperList):
        body = b"".join(_etf(item) for item in term.items)
        return struct.pack(">BI", 108, len(term.items)) + body + _etf(term.tail)
    if isinstance(term, dict):
        body = b"".join(_etf(k) + _etf(v) for k, v in term.items())
        return struct.pack(">BI", 116, len(term)) + body
    raise TypeError(f"not a term: {term!r}")


@dataclass(frozen=True)
class ConsultTask:
    """One file for :func:`consult_batch`; ``etf``/``ours`` are optional comparisons."""

    source: Path
    etf: Path | None = None
    ours: Path | None = None


@dataclass(frozen=True)
class ConsultResult:
    """``consulted``: erl read the source; ``etf_equal``/``ours_equal``: None if not asked
    (or consult failed); ``ours_readable``: erl could read our printed file."""

    consulted: bool
    etf_equal: bool | None
    ours_equal: bool | None
    ours_readable: bool | None


_BATCH = r"""
[Manifest, Out] = init:get_plain_arguments(),
{ok, Tasks} = file:consult(Manifest),
Cmp = fun(_, none) -> "-";
         (T, {etf, P}) -> {ok, B} = file:read_file(P), atom_to_list(T =:= binary_to_term(B));
         (T, {ours, P}) -> case file:consult(P) of
                               {ok, T2} -> atom_to_list(T =:= T2);
                               _ -> "unreadable"
                           end
      end,
Lines = [case file:consult(Src) of
             {ok, Terms} -> ["ok ", Cmp(Terms, Etf), " ", Cmp(Terms, Ours), "\n"];
             {error, _} -> "error - -\n"
         end || {Src, Etf, Ours} <- Tasks],
ok = file:write_file(Out, Lines),
halt().
"""


def _erl_string(path: Path) -> str:
    text = str(path)
    if any(c in text for c in '"\\\n') or not text.isascii():
        raise ValueError(f"path unsafe for the manifest: {text!r}")
    return f'"{text}"'


def consult_batch(workdir: Path, tasks: list[ConsultTask]) -> list[ConsultResult]:
    """Run every task in one ``erl``; results are in task order."""
    assert ERL is not None
    manifest = workdir / "manifest.eterm"
    out = workdir / "results.txt"
    lines = []
    for task in tasks:
        etf = f"{{etf,{_erl_string(task.etf)}}}" if task.etf else "none"
        ours = f"{{ours,{_erl_string(task.ours)}}}" if task.ours else "none"
        lines.append(f"{{{_erl_string(task.source)},{etf},{ours}}}.\n")
    manifest.write_text("".join(lines), encoding="ascii")
    subprocess.run(
        [ERL, "-noshell", "-noinput", "-eval", _BATCH, "-extra", str(manifest), str(out)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    results = []
    flag = {"true": True, "false": False, "-": None, "unreadable": False}
    for line in out.read_text(encoding="ascii").splitlines():
        status, etf_equal, ours_equal = line.split()
        results.append(
            ConsultResult(
                consulted=status == "ok",
                etf_equal=flag[etf_equal],
                ours_equal=flag[ours_equal],
                ours_readable=None if ours_equal == "-" else ours_equal != "unreadable",
            )
        )
    assert len(results) == len(tasks)
    return results


_PORT = r"""
Hex = fun(B) -> binary:encode_hex(B) end,
Loop = fun Loop() ->
    case io:get_line("") of
        eof -> halt();
        <<"C ", Rest/binary>> ->
            [SrcHex, OursHex] = string:split(string:trim(Rest), " "),
            Src = unicode:characters_to_list(binary:decode_hex(SrcHex)),
            Erl = try
                      {ok, Tokens, _} = erl_scan:string(Src),
                      {ok, T0} = erl_parse:parse_term(Tokens),
                      {ok, T0}
                  catch _:_ -> error
                  end,
            Answer = case {Erl, OursHex} of
                         {error, <<"-">>} -> "agree";
                         {error, _} -> "erl-refuses";
                         {{ok, B0}, <<"-">>} when is_bitstring(B0), not is_binary(B0) ->
                             "agree";
                         {{ok, _}, <<"-">>} -> "erl-accepts";
                         {{ok, T1}, _} ->
                             case T1 =:= binary_to_term(binary:decode_hex(OursHex)) of
                                 true -> "agree";
                                 false -> "different"
                             end
                     end,
            io:put_chars([Answer, "\n"]),
            Loop();
        Line ->
            [EtfHex, TextHex] = string:split(string:trim(Line), " "),
            Term = binary_to_term(binary:decode_hex(EtfHex)),
            Text = unicode:characters_to_list(binary:decode_hex(TextHex)),
            Ours = case erl_scan:string(Text) of
                       {ok, Toks, _} ->
                           case erl_parse:parse_term(Toks) of
                               {ok, T} when T =:= Term -> "same";
                               {ok, _} -> "different";
                               _ -> "unparsable"
                           end;
                       _ -> "unscannable"
                   end,
            P = unicode:characters_to_binary(io_lib:format("~tp.~n", [Term])),
            W = unicode:characters_to_binary(io_lib:format("~tw.~n", [Term])),
            io:put_chars([Ours, " ", Hex(P), " ", Hex(W), "\n"]),
            Loop()
    end
end,
io:setopts([binary, {encoding, latin1}]),
Loop().
"""


class ErlangPort:
    """A long-lived ``erl`` that checks our printed text and prints terms its own way."""

    def __init__(self) -> None:
        assert ERL is not None
        self._proc = subprocess.Popen(
            [ERL, "-noshell", "-eval", _PORT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def exchange(self, term: Term, ours: str) -> tuple[str, str, str]:
        """Send ``term`` (as ETF) and our text for it (``format(term) + "."``); get back
        erl's verdict on our text (``same``/``different``/...) and erl's ``~tp`` and
        ``~tw`` renderings."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        request = to_etf(term).hex() + " " + ours.encode("utf-8").hex() + "\n"
        self._proc.stdin.write(request.encode("ascii"))
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline().decode("ascii").split()
        if len(reply) != 3:
            raise RuntimeError(f"erl port died or replied {reply!r}")
        verdict, pretty, written = reply
        return (
            verdict,
            bytes.fromhex(pretty).decode("utf-8"),
            bytes.fromhex(written).decode("utf-8"),
        )

    def compare(self, source: str, ours: Term | None) -> str:
        """Whether erl reads the one-term ``source`` as we do: ``agree`` (same term, or
        both refuse, or erl builds a bitstring we refuse on purpose), ``erl-refuses``,
        ``erl-accepts`` (we refused) or ``different``. ``ours`` is None when we refused."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        etf = "-" if ours is None else to_etf(ours).hex()
        request = "C " + source.encode("utf-8").hex() + " " + etf + "\n"
        self._proc.stdin.write(request.encode("ascii"))
        self._proc.stdin.flush()
        return self._proc.stdout.readline().decode("ascii").strip()

    def close(self) -> None:
        """Stop the VM (closing stdin makes it halt)."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
