"""Erlang-term source snippets shared by the unit tests and the real-``erl`` checks.

POSITIVE: (id, source, the term ``file:consult/1`` returns, as our model spells it).
NEGATIVE: (id, source, message fragment, line, column, whether ``file:consult/1`` itself
accepts it — true only for forms our model deliberately cannot hold).
The erl tests prove every expected value and every rejection against the installed OTP.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from bstore.specs.terms import Atom, ImproperList, Term

A = Atom


def s(text: str) -> list[Term]:
    """A charlist."""
    return list(map(ord, text))


POSITIVE: list[tuple[str, str, Term]] = [
    # atoms
    ("atom", "hello.", A("hello")),
    ("quoted-atom-space", "'hello world'.", A("hello world")),
    ("atom-at", "node@host.", A("node@host")),
    ("atom-digits-underscore", "a_1B.", A("a_1B")),
    ("quoted-reserved", "'end'.", A("end")),
    ("maybe-is-atom-in-otp25", "maybe.", A("maybe")),
    ("latin1-atom", "école.", A("école")),
    ("unicode-quoted-atom", "'日本'.", A("日本")),
    ("quoted-atom-hex", "'\\x{1F600}\\x41'.", A("\U0001f600A")),
    ("quoted-atom-with-dot-space", "'a. b'.", A("a. b")),
    ("quoted-atom-escapes", r"'a\'b\\c\n'.", A("a'b\\c\n")),
    ("empty-quoted-atom", "''.", A("")),
    ("atom-255", "'" + "a" * 255 + "'.", A("a" * 255)),
    # integers
    ("int", "42.", 42),
    ("int-base16", "16#FF.", 255),
    ("int-base16-lower", "16#ff.", 255),
    ("int-base2", "2#1010.", 10),
    ("int-base36", "36#zz.", 1295),
    ("int-separators", "1_000.", 1000),
    ("int-based-separators", "16#FF_FF.", 65535),
    ("int-negative", "-1.", -1),
    ("int-negative-space", "- 1.", -1),
    ("int-negative-based", "-16#F.", -15),
    ("int-plus", "+1.", 1),
    ("int-negative-char", "-$a.", -97),
    ("int-big", "123456789012345678901234567890.", 123456789012345678901234567890),
    ("int-huge", "1" + "0" * 5000 + ".", 10**5000),
    # characters
    ("char", "$a.", 97),
    ("char-newline-escape", r"$\n.", 10),
    ("char-backslash", "$\\\\.", 92),
    ("char-hex-braces", r"$\x{1F600}.", 0x1F600),
    ("char-space", "$ .", 32),
    ("char-s", r"$\s.", 32),
    ("char-ctrl", r"$\^a.", 1),
    ("char-octal", r"$\101.", 65),
    ("char-hex2", r"$\x41.", 65),
    ("char-quote", "$'.", 39),
    ("char-dquote", '$".', 34),
    ("char-percent", "$%.", 37),
    ("char-esc", r"$\e.", 27),
    ("char-literal-newline", "$\n.", 10),
    ("char-unicode", "$é.", 233),
    # floats
    ("float", "1.0.", 1.0),
    ("float-exp-neg", "1.0e-3.", 1.0e-3),
    ("float-exp-upper", "1.5E3.", 1500.0),
    ("float-exp-plus", "1.5e+2.", 150.0),
    ("float-separators", "1_0.0_1e1_0.", float("10.01e10")),
    ("float-negative", "-2.5.", -2.5),
    ("float-underflow", "1.0e-400.", 0.0),
    ("float-subnormal", "1.0e-320.", 1.0e-320),
    ("float-tenth", "0.1.", 0.1),
    ("float-max", "1.7976931348623157e308.", 1.7976931348623157e308),
    # strings
    ("string", '"abc".', s("abc")),
    ("string-empty", '"".', []),
    ("string-concat", '"a" "b".', s("ab")),
    ("string-concat-lines", '"a"\n  % c\n "b" "".', s("ab")),
    (
        "string-escapes",
        r'"\b\d\e\f\n\r\s\t\v\\\'\"".',
        [8, 127, 27, 12, 10, 13, 32, 9, 11, 92, 39, 34],
    ),
    ("string-ctrl", r'"\^a\^z\^?\^A".', [1, 26, 31, 1]),
    ("string-numeric-escapes", r'"\101\x41\x{1F600}\0".', [65, 65, 0x1F600, 0]),
    ("string-unknown-escape", r'"\z\8".', s("z8")),
    ("string-octal-greedy", r'"\1012".', [65, 50]),
    ("string-latin1", '"é".', [233]),
    ("string-cjk", '"日本".', [0x65E5, 0x672C]),
    ("string-multiline", '"a\nb".', s("a\nb")),
    ("string-escaped-newline", '"a\\\nb".', s("a\nb")),
    ("triple-quotes-concatenate-in-otp25", '"""a""".', s("a")),
    ("string-ctrl-newline", '"\\^\n".', [10]),
    ("string-nul-escape", '"\\x{0}\\000".', [0, 0]),
    ("string-escaped-unicode", '"\\é\\日".', [233, 0x65E5]),
    # binaries
    ("bin-text", '<<"abc">>.', b"abc"),
    ("bin-empty", "<<>>.", b""),
    ("bin-bytes", "<<1,2>>.", b"\x01\x02"),
    ("bin-utf8", '<<"x"/utf8>>.', b"x"),
    ("bin-utf8-latin", '<<"é"/utf8>>.', "é".encode()),
    ("bin-latin1", '<<"é">>.', b"\xe9"),
    ("bin-truncates-chars", '<<"日">>.', bytes([0x65E5 & 0xFF])),
    ("bin-size16", "<<1:16>>.", b"\x00\x01"),
    ("bin-little", "<<1:16/little>>.", b"\x01\x00"),
    ("bin-little-odd", "<<1:12/little, 1:4>>.", b"\x01\x01"),
    ("bin-utf16", '<<"ab"/utf16>>.', "ab".encode("utf-16-be")),
    ("bin-utf32-little", '<<"a"/utf32-little>>.', "a".encode("utf-32-le")),
    ("bin-negative", "<<-1>>.", b"\xff"),
    ("bin-truncate", "<<256, 257>>.", b"\x00\x01"),
    ("bin-nibbles", "<<1:4, 2:4>>.", b"\x12"),
    ("bin-float", "<<1.5/float>>.", struct.pack(">d", 1.5)),
    ("bin-float32", "<<1.5:32/float>>.", struct.pack(">f", 1.5)),
    ("bin-float-little", "<<1.5:32/float-little>>.", struct.pack("<f", 1.5)),
    ("bin-int-as-float", "<<2/float>>.", struct.pack(">d", 2.0)),
    ("bin-float16", "<<1.5:16/float>>.", struct.pack(">e", 1.5)),
    ("bin-float16-overflow", "<<70000:16/float>>.", b"\x7c\x00"),
    ("bin-float32-overflow", "<<-1.0e300:32/float>>.", b"\xff\x80\x00\x00"),
    ("bin-mixed", '<<$a, "bc", 100>>.', b"abcd"),
    ("bin-nested", '<<<<"ab">>/binary, "c">>.', b"abc"),
    ("bin-sized-binary", '<<(<<"ab">>):1/binary>>.', b"a"),
    ("bin-unit", "<<1:2/unit:8>>.", b"\x00\x01"),
    ("bin-utf8-max", "<<16#10FFFF/utf8>>.", chr(0x10FFFF).encode()),
    ("bin-string-size16", '<<"a":16>>.', b"\x00a"),
    ("bin-types", "<<1:8/integer-signed-big, -1:16/signed-little>>.", b"\x01\xff\xff"),
    ("bin-bytes-type", '<<<<"ab">>/bytes>>.', b"ab"),
    ("bin-paren-value", "<<(1), (-2)>>.", b"\x01\xfe"),
    ("bin-char-size", "<<1:$\\b>>.", b"\x01"),
    # tuples and lists
    ("tuple-empty", "{}.", ()),
    ("tuple-nested", "{a, {b, c}}.", (A("a"), (A("b"), A("c")))),
    ("list-empty", "[].", []),
    ("list", "[1, 2, 3].", [1, 2, 3]),
    ("list-improper", "[a | b].", ImproperList((A("a"),), A("b"))),
    ("list-tail-list", "[1, 2 | [3]].", [1, 2, 3]),
    ("list-tail-string", '[1 | "ab"].', [1, 97, 98]),
    ("list-tail-improper", "[a | [b | c]].", ImproperList((A("a"), A("b")), A("c"))),
    ("list-tail-empty", "[a | []].", [A("a")]),
    ("list-nested-empty", "[[]].", [[]]),
    # maps
    ("map-empty", "#{}.", {}),
    ("map-nested", "#{a => 1, b => #{c => [1]}}.", {A("a"): 1, A("b"): {A("c"): [1]}}),
    ("map-space-after-hash", "# {a => 1}.", {A("a"): 1}),
    ("map-duplicate-last-wins", "#{a => 1, a => 2}.", {A("a"): 2}),
    ("map-tuple-key", '#{{a, 1} => <<"x">>}.', {(A("a"), 1): b"x"}),
    ("map-number-keys", "#{1 => a, 2.0 => b}.", {1: A("a"), 2.0: A("b")}),
    ("map-binary-key", '#{<<"k">> => "v"}.', {b"k": s("v")}),
    # parentheses, comments, white space
    ("paren", "(1).", 1),
    ("paren-negative", "-(1).", -1),
    ("paren-in-tuple", "{(a)}.", (A("a"),)),
    ("paren-deep", "((([x]))).", [A("x")]),
    ("comments", "% first\n a % after\n . % end", A("a")),
    ("dot-then-comment", "a.% c", A("a")),
    ("nbsp-is-white-space", "\u00a0a.", A("a")),
    ("crlf", "{a,\r\n b}.\r\n", (A("a"), A("b"))),
    ("tabs", "\t{\ta\t}\t.", (A("a"),)),
    (
        "app-config",
        '[{kernel, [{logger_level, info}]},\n {web, [{port, 8080}, {hosts, ["a", <<"b">>]}]}].',
        [
            (A("kernel"), [(A("logger_level"), A("info"))]),
            (A("web"), [(A("port"), 8080), (A("hosts"), [s("a"), b"b"])]),
        ],
    ),
]

NEGATIVE: list[tuple[str, str, str, int, int, bool]] = [
    ("map-exact-field", "#{a := 1}.", "expected '=>' or ',' in map, found ':='", 1, 5, False),
    ("map-exact-later-line", "#{a => 1,\n  b := 2}.", "found ':='", 2, 5, False),
    ("variable", "X.", "variable X is not allowed", 1, 1, False),
    ("underscore", "{a, _}.", "variable _ is not allowed", 1, 5, False),
    ("expression", "1 + 2.", "expected '.' after the term, found '+'", 1, 3, False),
    ("reserved-end", "end.", "expected a term, found reserved word 'end'", 1, 1, False),
    ("reserved-in-list", "[a, case].", "found reserved word 'case'", 1, 5, False),
    ("negate-negative", "-(-1).", "'-' applies only to a number literal", 1, 1, False),
    ("double-minus", "- -1.", "'-' applies only to a number literal", 1, 1, False),
    ("negate-atom", "-a.", "'-' applies only to a number literal", 1, 1, False),
    ("negate-string", '- "a".', "'-' applies only to a number literal", 1, 1, False),
    ("missing-dot", "a", "expected '.' after the term, found end of file", 1, 2, False),
    ("second-missing-dot", "a.\nb", "found end of file", 2, 2, False),
    ("unclosed-list", "[1, 2.", "expected ',', '|' or ']' in list, found '.'", 1, 6, False),
    ("unclosed-tuple", "{a, b.", "expected ',' or '}' in tuple", 1, 6, False),
    ("unterminated-string", '"abc', "unterminated string", 1, 1, False),
    ("unterminated-atom", "'abc", "unterminated quoted atom", 1, 1, False),
    ("empty-based", "16#.", "invalid base-16 integer", 1, 1, False),
    ("bad-base", "37#1.", "invalid integer base 37", 1, 1, False),
    ("digit-out-of-base", "2#102.", "2#102", 1, 1, False),
    ("float-no-exponent", "1.0e.", "missing exponent", 1, 1, False),
    ("float-overflow", "1.0e400.", "out of range", 1, 1, False),
    ("float-without-fraction", "1e10.", "found atom 'e10'", 1, 2, False),
    ("record", "#rec{a = 1}.", "expected '{' after '#'", 1, 2, False),
    ("fun", "fun lists:map/2.", "funs are not supported", 1, 1, True),
    ("list-map-key", "#{[1] => a}.", "map key [1] is a list or map", 1, 3, True),
    ("int-float-key-collision", "#{1 => a, 1.0 => b}.", "map keys 1 and 1.0", 1, 11, True),
    ("bitstring", "<<1:3>>.", "bitstring", 1, 3, True),
    ("binary-of-string", '<<"a"/binary>>.', "invalid binary segment", 1, 3, False),
    ("float-in-int-segment", "<<1.5>>.", "integer segment needs an integer", 1, 3, False),
    ("unknown-bin-type", "<<1:8/foo>>.", "unknown binary type specifier 'foo'", 1, 3, False),
    ("utf8-with-unit", "<<1/utf8-unit:8>>.", "takes no size or unit", 1, 3, False),
    ("negative-size", "<<1:(-8)>>.", "not a non-negative integer", 1, 5, False),
    ("float-size", "<<1:8.0>>.", "not a non-negative integer", 1, 5, False),
    ("bin-variable", "<<X>>.", "variable X", 1, 3, False),
    ("comprehension", "[X || X <- L].", "variable X", 1, 2, False),
    ("comprehension-2", "[1 || a].", "expected ',', '|' or ']' in list, found '||'", 1, 4, False),
    ("two-terms-comma", "a, b.", "expected '.' after the term, found ','", 1, 2, False),
    ("bad-hex-escape", '"\\x{110000}".', "invalid escape sequence", 1, 2, False),
    ("bad-short-hex", '"\\xZZ".', "invalid escape sequence", 1, 2, False),
    ("surrogate-escape", "'\\x{D800}'.", "invalid escape sequence", 1, 2, False),
    ("lone-dollar", "$", "invalid character literal", 1, 1, False),
    ("trailing-comma-map", "#{a => 1,}.", "expected a term, found '}'", 1, 10, False),
    ("trailing-comma-list", "[a,].", "expected a term, found ']'", 1, 4, False),
    ("period-no-space", "a.b.", "found '.' (not followed by white space)", 1, 2, False),
    ("illegal-char", "\u00a7.", "illegal character", 1, 1, False),
    ("position-after-lines", "a.\n\n  [1,\n   X].", "variable X", 4, 4, False),
    ("tabs-count-one-column", "\t\tX.", "variable X", 1, 3, False),
    ("atom-too-long-quoted", "'" + "a" * 256 + "'.", "longer than 255", 1, 1, False),
    ("atom-too-long", "a" * 256 + ".", "longer than 255", 1, 1, False),
    ("adjacent-atoms", "'a' 'b'.", "found atom 'b'", 1, 5, False),
    ("string-then-atom", '"a" b.', "found atom 'b'", 1, 5, False),
    ("tuple-missing-comma", "{a b}.", "expected ',' or '}' in tuple, found atom 'b'", 1, 4, False),
    ("noncharacter-in-string", '"a\ufffe".', "illegal character U+FFFE in string", 1, 3, False),
    ("noncharacter-in-atom", "'\\\uffff'.", "illegal character U+FFFF in quoted atom", 1, 3, False),
    ("noncharacter-in-comment", "% \ufffe\na.", "illegal character U+FFFE", 1, 3, False),
    ("map-update", "#{a => 1}#{a => 2}.", "expected '.' after the term, found '#'", 1, 10, False),
    ("pid-like", "<0.1.0>.", "expected a term, found '<'", 1, 1, False),
    ("call", "f(1).", "expected '.' after the term, found '('", 1, 2, False),
    ("remote", "m:f.", "found ':'", 1, 2, False),
    ("binary-size-var", "<<1:N>>.", "variable N", 1, 5, False),
    ("unclosed-paren", "(1.", "expected ')'", 1, 3, False),
]


# -- generated terms (hypothesis): every shape the model has --------------------------

_atoms = st.builds(
    Atom, st.text(max_size=20).filter(lambda t: "\ufffe" not in t and "\uffff" not in t)
)
_scalars = st.one_of(
    _atoms,
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False, allow_infinity=False),
    st.binary(max_size=20),
    st.text(max_size=10).map(lambda t: [ord(c) for c in t if ord(c) < 0xD800 or ord(c) > 0xDFFF]),
)
_keys = st.one_of(_atoms, st.integers(), st.binary(max_size=5), st.tuples(_atoms, st.integers()))


def _extend(children: st.SearchStrategy[Term]) -> st.SearchStrategy[Term]:
    return st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(_keys, children, max_size=4),
        st.builds(
            lambda items, tail: ImproperList(tuple(items), tail),
            st.lists(children, min_size=1, max_size=3),
            st.one_of(_atoms, st.integers(), st.tuples(children)),
        ),
    )


#: Any term of the model; map keys avoid int/float pairs Python would merge.
TERMS = st.recursive(_scalars, _extend, max_leaves=25)
