"""Unified diffs of text, bounded in time and in size: what a report of changes shows of a file.

difflib's matcher can take time quadratic in the number of lines, worse with lines repeated
many times, which whoever writes the file may arrange. So the lines the two sides share at the
head and at the tail are set aside first, in linear time, and a middle too large to match is
shown as wholly replaced. The output is what `git apply` and `patch` read: `--- a/x`,
`+++ b/x` (`/dev/null` for a side that does not exist), hunks with 3 lines of context, and
"\\ No newline at end of file" where one is missing.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator

_MATCH_LIMIT = 4_000_000  # lines x lines beyond which difflib may take seconds
_CONTEXT = 3

Region = tuple[int, int, int, int]  # a[i1:i2] became b[j1:j2]


def lines(data: bytes) -> list[str] | None:
    """The lines of a text file (UTF-8, no NUL), each with its newline; None if it is binary."""
    if b"\0" in data:
        return None
    try:
        parts = data.decode().split("\n")
    except UnicodeDecodeError:
        return None
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def unified(
    a: list[str], b: list[str], old_name: str | None, new_name: str | None, cap: int
) -> tuple[str, bool]:
    """The diff from `a` to `b`, cut to at most `cap` bytes of UTF-8 (and whether it was cut).
    A name of None is a side that does not exist; "" is the diff of equal sides."""
    pieces: list[str] = []
    used = 0
    for piece in _diff(a, b, _quoted(old_name), _quoted(new_name)):
        used += len(piece.encode())
        if used > cap:
            return "".join(pieces), True
        pieces.append(piece)
    return "".join(pieces), False


def _diff(a: list[str], b: list[str], old_name: str, new_name: str) -> Iterator[str]:
    regions = _regions(a, b)
    if regions:
        yield f"--- {old_name}\n+++ {new_name}\n"
    hunks: list[list[Region]] = []
    for region in regions:  # changes closer than twice the context share a hunk
        if hunks and region[0] - hunks[-1][-1][1] <= 2 * _CONTEXT:
            hunks[-1].append(region)
        else:
            hunks.append([region])
    for hunk in hunks:
        (i1, _, j1, _), (_, i2, _, j2) = hunk[0], hunk[-1]
        start, end = max(0, i1 - _CONTEXT), min(len(a), i2 + _CONTEXT)
        yield f"@@ -{_span(start, end)} +{_span(j1 - (i1 - start), j2 + (end - i2))} @@\n"
        for i1, i2, j1, j2 in hunk:
            yield from _lines(" ", a[start:i1])
            yield from _lines("-", a[i1:i2])
            yield from _lines("+", b[j1:j2])
            start = i2
        yield from _lines(" ", a[start:end])


def _regions(a: list[str], b: list[str]) -> list[Region]:
    head, tail, shorter = 0, 0, min(len(a), len(b))
    while head < shorter and a[head] == b[head]:
        head += 1
    while tail < shorter - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    a_end, b_end = len(a) - tail, len(b) - tail
    if head == a_end and head == b_end:
        return []
    if (a_end - head) * (b_end - head) > _MATCH_LIMIT:
        return [(head, a_end, head, b_end)]
    matcher = difflib.SequenceMatcher(None, a[head:a_end], b[head:b_end])
    return [
        (i1 + head, i2 + head, j1 + head, j2 + head)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal"
    ]


def _span(start: int, end: int) -> str:
    """A hunk's range: an empty one is named by the line before it, as diff(1) does."""
    if end - start == 1:
        return str(start + 1)
    return f"{start + 1 if end > start else start},{end - start}"


def _lines(sign: str, text: list[str]) -> Iterator[str]:
    for line in text:
        end = "" if line.endswith("\n") else "\n\\ No newline at end of file\n"
        yield f"{sign}{line}{end}"


def _quoted(name: str | None) -> str:
    """A header's name, quoted if it could be misread (a newline would end the header)."""
    if name is None:
        return "/dev/null"
    if name.isprintable() and '"' not in name and "\\" not in name:
        return name
    return json.dumps(name, ensure_ascii=False)
