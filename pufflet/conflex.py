"""Lexer for pufflet.conf(5).

Splits a file into statements of tokens, the way the yacc lexers of
pf.conf and httpd.conf do: a backslash before a newline joins lines
(also inside comments and quoted strings, as there), '#' starts a
comment outside quotes, and double-quoted strings know two escapes,
\\" and \\\\.  Macros are not expanded here: that needs the macros
defined so far, which only the parser knows.
"""

from __future__ import annotations

from dataclasses import dataclass

_BLANK = " \t\r\f\v"    # \r so that files written on other systems still lex
_WORD_END = _BLANK + '\n"#\\'


@dataclass(frozen=True)
class Token:
    text: str
    quoted: bool    # quoted strings are never keywords nor macro references
    line: int


@dataclass(frozen=True)
class Statement:
    line: int                       # where the statement starts
    tokens: tuple[Token, ...]
    error: str | None = None        # set if the statement could not be lexed


def lex(text: str) -> list[Statement]:
    """Split text into statements; lexical errors become statements too,
    so that the parser reports them in file order with everything else."""
    out: list[Statement] = []
    toks: list[Token] = []
    error: str | None = None
    start = 0                       # line of the first token or error
    started = False
    line = 1
    i, n = 0, len(text)

    def fail(msg: str, where: int) -> None:
        # Keep only the first error of a statement: the rest is noise.
        nonlocal error
        if error is None:
            error = msg
            mark(where)

    def mark(where: int) -> None:
        nonlocal start, started
        if not started:
            start, started = where, True

    def flush() -> None:
        nonlocal toks, error, started
        if error is not None:
            out.append(Statement(start, (), error))
        elif toks:
            out.append(Statement(start, tuple(toks)))
        toks, error, started = [], None, False

    while i < n:
        c = text[i]
        if c == "\n":
            flush()
            line += 1
            i += 1
        elif c in _BLANK:
            i += 1
        elif c == "\\":
            j = _continuation(text, i)
            if j < 0:
                fail("stray backslash outside a quoted string", line)
                i += 1
            else:
                line += text.count("\n", i, j)
                i = j
        elif c == "#":
            # the newline ending the comment is left to end the statement;
            # count those swallowed by continuations
            j = _skip_comment(text, i)
            line += text.count("\n", i, j)
            i = j
        elif c == '"':
            first = line
            i, line, value, msg = _quoted(text, i, line)
            if msg is not None:
                fail(msg, first)
                continue
            if i < n and text[i] not in _BLANK + "\n#\\":
                fail("expected white space after quoted string", first)
            mark(first)
            toks.append(Token(value, True, first))
        else:
            j = i
            while j < n and text[j] not in _WORD_END:
                j += 1
            mark(line)
            toks.append(Token(text[i:j], False, line))
            i = j
    flush()
    return out


def _continuation(text: str, i: int) -> int:
    """If text[i] is a backslash ending its line, return the index just
    past the newline (or end of text), else -1.  Trailing blanks after the
    backslash are forgiven: they are invisible in an editor."""
    j = i + 1
    while j < len(text) and text[j] in _BLANK:
        j += 1
    if j == len(text):
        return j
    if text[j] == "\n":
        return j + 1
    return -1


def _skip_comment(text: str, i: int) -> int:
    """Return the index of the newline ending the comment at text[i]."""
    n = len(text)
    while i < n and text[i] != "\n":
        if text[i] == "\\":
            j = _continuation(text, i)
            if j > 0 and text[j - 1] == "\n":
                i = j
                continue
        i += 1
    return i


def _quoted(text: str, i: int, line: int) -> tuple[int, int, str, str | None]:
    """Read the quoted string opening at text[i].  Return the index past
    it, the current line, its value, and an error or None."""
    out: list[str] = []
    error: str | None = None
    n = len(text)
    i += 1
    while i < n:
        c = text[i]
        if c == '"':
            return i + 1, line, "".join(out), error
        if c == "\n":
            # leave the newline to end the statement
            return i, line, "", "unterminated quoted string"
        if c == "\\":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt in ('"', "\\"):
                out.append(nxt)
                i += 2
                continue
            j = _continuation(text, i)
            if j > 0:
                line += text.count("\n", i, j)
                i = j
                continue
            # read on to the closing quote so the rest is not lexed as words
            if error is None:
                error = f"invalid escape '\\{nxt}' in quoted string"
            i += 1
            continue
        out.append(c)
        i += 1
    return i, line, "", "unterminated quoted string"
