"""``payloadShell: true`` templates: where each ``{payload}`` stands, as /bin/sh will read it.

The payload is never pasted into the script. It is passed to the shell as ``$1``
(``/bin/sh -c SCRIPT sh PAYLOAD``) and each placeholder becomes a reference to ``$1``
that is quoted right for the spot it stands in, so the payload stays one word, unexpanded,
whatever it holds. Quoting it in place instead (``shlex.quote``) broke as soon as the
template put the placeholder inside quotes of its own (``echo '{payload}'``).

The scanner knows the quoting rules of POSIX sh that decide the quote state: backslash
escapes (outside quotes and inside double quotes), single quotes (no escapes inside),
double quotes and comments. It does not follow nested contexts such as ``"$(... '...')"``:
there a placeholder may get the replacement of the outer context, which can leave ``$1``
unquoted (split into words) but never makes the payload shell code, since only ``$1``
and quote characters are ever written into the script.
"""

from __future__ import annotations

from typing import Final, Literal

PLACEHOLDER: Final = "{payload}"  # the same text as schemas.submission.PAYLOAD_PLACEHOLDER

# what a placeholder becomes in each quote state: always exactly one word holding $1
OUTSIDE: Final = '"$1"'
IN_DOUBLE: Final = "$1"
IN_SINGLE: Final = "'\"$1\"'"  # close the single quotes, a double-quoted $1, reopen them

# after one of these (unquoted) a '#' starts a word, hence a comment
_WORD_START: Final = frozenset(" \t\n;&|()<>")

State = Literal["outside", "single", "double"]


def shell_template(template: str) -> str:
    """The script to run as ``/bin/sh -c SCRIPT sh PAYLOAD``: ``template`` with each
    ``{payload}`` replaced by a reference to ``$1`` quoted for its context.

    Raises ValueError for unbalanced quotes, a trailing backslash, or a placeholder right
    after a backslash (escaping its first character would make the replacement's own
    quote a literal character)."""
    out: list[str] = []
    state: State = "outside"
    opened = 0  # where the open quote started, for the error message
    word_start = True  # an unquoted '#' here starts a comment
    i, n = 0, len(template)
    while i < n:
        if template.startswith(PLACEHOLDER, i):
            out.append(OUTSIDE if state == "outside" else IN_DOUBLE if state == "double" else IN_SINGLE)
            i += len(PLACEHOLDER)
            word_start = False
            continue
        c = template[i]
        if state == "single":
            if c == "'":
                state = "outside"
        elif c == "\\":
            if i + 1 == n:
                raise ValueError(f"shell template ends with a backslash: {template!r}")
            if template.startswith(PLACEHOLDER, i + 1):
                # the backslash would escape the replacement's first character ('"' or '$')
                raise ValueError(f"shell template has {PLACEHOLDER} right after a backslash (at {i}): {template!r}")
            if state == "outside" or template[i + 1] in '$`"\\\n':
                # an escaped character: copied as is, it cannot open or close a quote
                out.append(template[i : i + 2])
                i += 2
                word_start = False
                continue
        elif state == "double":
            if c == '"':
                state = "outside"
        elif c == "'":
            state, opened = "single", i
        elif c == '"':
            state, opened = "double", i
        elif c == "#" and word_start:
            # a comment runs to the end of the line: quotes in it do not count
            end = template.find("\n", i)
            end = n if end < 0 else end
            out.append(template[i:end])
            i = end
            continue
        word_start = state == "outside" and c in _WORD_START
        out.append(c)
        i += 1
    if state != "outside":
        quote = "single" if state == "single" else "double"
        raise ValueError(f"shell template has an unclosed {quote} quote (opened at {opened}): {template!r}")
    return "".join(out)
