"""Erlang tokens, scanned the way OTP 25's ``erl_scan`` scans them for ``file:consult/1``.

One compiled master regular expression finds every token (and every run of white space
and comments) in a single ``finditer`` pass; Python code runs once per token, never once
per character. Escapes inside strings, quoted atoms and ``$c`` characters are decoded by
a second regular expression only when a backslash is present.

Tokens are plain tuples ``(kind, value, offset)`` because the parser looks at hundreds of
thousands of them and tuples are the cheapest thing Python builds. ``kind`` is one of
``atom int float char string var reserved dot eof`` or, for punctuation, the punctuation
itself (``"{"``, ``"=>"``, ``"<<"`` ...). ``offset`` is the index of the token's first
character in the text; :class:`LineIndex` turns it into a line and column on demand.
"""

from __future__ import annotations

import bisect
import re
from typing import Any

from bstore.specs.terms.errors import TermSyntaxError
from bstore.specs.terms.model import Atom

Token = tuple[str, Any, int]

# OTP 25 reserved words (erl_scan:f_reserved_word/1). `maybe` and `else` only become
# keywords when the experimental maybe_expr feature is enabled, which consult never does.
RESERVED_WORDS = frozenset(
    {
        *("after", "and", "andalso", "band", "begin", "bnot", "bor", "bsl", "bsr", "bxor"),
        *("case", "catch", "cond", "div", "end", "fun", "if", "let", "not", "of", "or"),
        *("orelse", "receive", "rem", "try", "when", "xor"),
    }
)

# erl_scan's limit: list_to_atom/1 refuses atoms longer than 255 characters.
MAX_ATOM_LENGTH = 255

# Erlang treats code points 0-32 and 128-160 as white space (?WHITE_SPACE in erl_scan).
_WS_CHARS = r"\x00-\x20\x80-\xa0"
# Characters erl_scan refuses anywhere (not ?UNICODE). Strictly decoded files hold no
# surrogates, but text handed to parse() directly might.
_BAD = r"\ud800-\udfff\ufffe\uffff"
_NAME = r"[a-zA-Z0-9_@\xc0-\xd6\xd8-\xf6\xf8-\xff]*"
_DIGITS = r"[0-9]+(?:_[0-9]+)*"
_ESCAPE_IN_CHAR = r"\\(?:[0-7]{1,3}|x\{[0-9a-fA-F]*\}|x[0-9a-fA-F]{2}|\^[\s\S]|[^x" + _BAD + "])"

# Every match is one token preceded by any white space and comments (so finditer yields
# exactly one match per token); `eof` matches the empty end of the text, `bad` any
# character no token can start with. Order matters where prefixes overlap: `...`/`..`
# before the end-of-term dot, the dot before a plain '.'.
_MASTER = re.compile(
    rf"(?:[{_WS_CHARS}]++|%[^\n{_BAD}]*+)*+(?:"
    + "|".join(
        [
            r"(?P<punct>=:=|=/=|\.\.\.|<<|>>|=>|:=|\.\.|<-|<=|>=|->|--|\+\+|=<|==|/=|\|\||::"
            r"|\?=|[{}\[\](),|#:/\-+*<>=!?;@\\^`~&])",
            rf"(?P<atom>[a-z\xdf-\xf6\xf8-\xff]{_NAME})",
            rf"(?P<num>{_DIGITS}(?:#(?:[0-9a-zA-Z]+(?:_[0-9a-zA-Z]+)*)?"
            rf"|\.[0-9]+(?:_[0-9]+)*(?:[eE][+-]?(?:{_DIGITS})?)?)?)",
            rf'(?P<string>"[^"\\{_BAD}]*(?:\\[^{_BAD}][^"\\{_BAD}]*)*")',
            rf"(?P<dot>\.(?=[{_WS_CHARS}%]|\Z))",
            rf"(?P<var>[A-Z_\xc0-\xd6\xd8-\xde]{_NAME})",
            rf"(?P<qatom>'[^'\\{_BAD}]*(?:\\[^{_BAD}][^'\\{_BAD}]*)*')",
            rf"(?P<char>\$(?:{_ESCAPE_IN_CHAR}|[^\\{_BAD}]))",
            r"(?P<period>\.)",
            r"(?P<eof>\Z)",
            r"(?P<bad>[\s\S])",
        ]
    )
    + ")"
)
_G = _MASTER.groupindex
_PUNCT, _ATOM, _NUM, _STRING, _DOT = _G["punct"], _G["atom"], _G["num"], _G["string"], _G["dot"]
_VAR, _QATOM, _CHAR, _PERIOD, _EOF = _G["var"], _G["qatom"], _G["char"], _G["period"], _G["eof"]

_ESCAPE = re.compile(
    r"\\(?:(?P<oct>[0-7]{1,3})|x\{(?P<hexb>[0-9a-fA-F]*)\}|x(?P<hex2>[0-9a-fA-F]{2})"
    r"|\^(?P<ctl>[\s\S])|(?P<other>[\s\S]))"
)

# \b \d \e \f \n \r \s \t \v; any other escaped character stands for itself.
_SIMPLE_ESCAPES = {
    "b": "\b",
    "d": "\x7f",
    "e": "\x1b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "s": " ",
    "t": "\t",
    "v": "\v",
}


def is_unicode_scalar(code: int) -> bool:
    """Whether erl_scan accepts ``code`` as a character (its ``?UNICODE`` guard)."""
    return 0 <= code < 0xD800 or 0xDFFF < code < 0xFFFE or 0xFFFF < code <= 0x10FFFF


class LineIndex:
    """Maps character offsets in a text to 1-based (line, column) pairs."""

    def __init__(self, text: str) -> None:
        self._starts = [0]
        self._starts.extend(m.end() for m in re.finditer("\n", text))

    def position(self, offset: int) -> tuple[int, int]:
        """The 1-based line and column of ``offset`` (columns count characters)."""
        index = bisect.bisect_right(self._starts, offset) - 1
        return index + 1, offset - self._starts[index] + 1


def syntax_error(
    text: str, source: str, offset: int, what: str, hint: str | None = None
) -> TermSyntaxError:
    """A :class:`TermSyntaxError` for ``what`` at ``offset`` of ``text``."""
    line, column = LineIndex(text).position(offset)
    return TermSyntaxError(source, line, column, what, hint)


def parse_digits(digits: str, base: int) -> int:
    """``int(digits, base)`` without CPython's 4300-digit limit (Erlang has none)."""
    if len(digits) <= 4000:
        return int(digits, base)
    low = len(digits) // 2
    scale: int = base**low
    return parse_digits(digits[:-low], base) * scale + parse_digits(digits[-low:], base)


def _decode_escapes(body: str, text: str, source: str, body_offset: int) -> str:
    """Replace the escape sequences of a string, quoted atom or char body."""

    def replace(m: re.Match[str]) -> str:
        group = m.lastgroup
        value = m.group(group or "other")
        code: int
        if group == "oct":
            code = int(value, 8)
        elif group == "hexb":
            code = int(value, 16) if value else -1
        elif group == "hex2":
            code = int(value, 16)
        elif group == "ctl":
            code = ord(value) & 31
        elif value == "x":
            code = -1
        else:
            return _SIMPLE_ESCAPES.get(value, value)
        if not is_unicode_scalar(code):
            raise syntax_error(
                text,
                source,
                body_offset + m.start(),
                f"invalid escape sequence {m.group(0)!r}",
                "use \\xHH, \\x{H...} with a valid Unicode code point, or \\OOO octal",
            )
        return chr(code)

    return _ESCAPE.sub(replace, body)


_QUOTED_PREFIX = {
    '"': re.compile(rf'"(?:[^"\\{_BAD}]|\\[^{_BAD}])*'),
    "'": re.compile(rf"'(?:[^'\\{_BAD}]|\\[^{_BAD}])*"),
}


def _describe_bad(text: str, offset: int) -> tuple[int, str, str | None]:
    """Where and why no token starts at ``offset`` (used only on the error path)."""
    char = text[offset]
    if char in _QUOTED_PREFIX:
        what = "string" if char == '"' else "quoted atom"
        match = _QUOTED_PREFIX[char].match(text, offset)
        end = match.end() if match else offset + 1
        if end >= len(text):
            return offset, f"unterminated {what}", f"close it with {char}"
        if text[end] == "\\":
            end += 1
        return end, f"illegal character U+{ord(text[end]):04X} in {what}", None
    if char == "\ufeff":
        return offset, "byte order mark U+FEFF is not allowed", "save the file without a BOM"
    if char == "$":
        return offset, "invalid character literal", "write e.g. $a, $\\n or $\\x{1F600}"
    if not is_unicode_scalar(ord(char)):
        return offset, f"illegal character U+{ord(char):04X}", None
    return offset, f"illegal character {char!r}", None


def tokenize(text: str, source: str) -> list[Token]:
    """Scan ``text`` into tokens, ending with an ``eof`` token.

    Raises :class:`TermSyntaxError` at the first character erl_scan would refuse.
    """
    tokens: list[Token] = []
    append = tokens.append
    atoms: dict[str, Atom] = {}
    for m in _MASTER.finditer(text):
        group = m.lastindex or 0  # every alternative is a group, so never None
        lexeme = m.group(group)
        start = m.start(group)
        if group == _PUNCT:
            append((lexeme, None, start))
        elif group == _ATOM:
            atom = atoms.get(lexeme)
            if atom is None:
                if lexeme in RESERVED_WORDS:
                    append(("reserved", lexeme, start))
                    continue
                if len(lexeme) > MAX_ATOM_LENGTH:
                    raise syntax_error(
                        text, source, start, f"atom longer than {MAX_ATOM_LENGTH} characters"
                    )
                atom = atoms[lexeme] = Atom(lexeme)
            append(("atom", atom, start))
        elif group == _NUM:
            append(_number(lexeme, text, source, start))
        elif group == _STRING:
            body = lexeme[1:-1]
            if "\\" in body:
                body = _decode_escapes(body, text, source, start + 1)
            append(("string", body, start))
        elif group == _DOT:
            append(("dot", None, start))
        elif group == _VAR:
            append(("var", lexeme, start))
        elif group == _QATOM:
            name = lexeme[1:-1]
            if "\\" in name:
                name = _decode_escapes(name, text, source, start + 1)
            if len(name) > MAX_ATOM_LENGTH:
                raise syntax_error(
                    text, source, start, f"atom longer than {MAX_ATOM_LENGTH} characters"
                )
            atom = atoms.get(name)
            if atom is None:
                atom = atoms[name] = Atom(name)
            append(("atom", atom, start))
        elif group == _CHAR:
            body = lexeme[1:]
            if len(body) > 1:
                body = _decode_escapes(body, text, source, start + 1)
            append(("char", ord(body), start))
        elif group == _PERIOD:
            append((".", None, start))
        elif group == _EOF:
            break
        else:
            where, what, hint = _describe_bad(text, start)
            raise syntax_error(text, source, where, what, hint)
    append(("eof", None, len(text)))
    return tokens


def _number(lexeme: str, text: str, source: str, start: int) -> Token:
    """The ``int`` or ``float`` token for a number lexeme (with optional ``_`` separators)."""
    digits = lexeme.replace("_", "")
    if "#" in lexeme:
        base_text, _, value_text = digits.partition("#")
        base = int(base_text) if len(base_text) < 5 else 0
        if not 2 <= base <= 36:
            raise syntax_error(text, source, start, f"invalid integer base {base_text}")
        try:
            if not value_text:
                raise ValueError(value_text)
            number: int = parse_digits(value_text, base)
            return ("int", number, start)
        except ValueError:
            raise syntax_error(
                text, source, start, f"invalid base-{base} integer {lexeme!r}"
            ) from None
    if "." in lexeme:
        if lexeme[-1] in "eE+-":
            raise syntax_error(text, source, start, f"invalid float {lexeme!r}: missing exponent")
        value = float(digits)
        if value in (float("inf"), float("-inf")):
            raise syntax_error(text, source, start, f"float {lexeme!r} out of range")
        return ("float", value, start)
    return ("int", parse_digits(digits, 10), start)
