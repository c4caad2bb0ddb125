import random
import subprocess
import time
from pathlib import Path

import pytest

from codestation import diffs


def apply(diff: str, old: str, tmp_path: Path) -> str:
    """What patch(1) makes of `old` with `diff`: a diff is right if it applies exactly."""
    (tmp_path / "f").write_text(old)
    subprocess.run(
        ["patch", "--quiet", "--force", "--no-backup-if-mismatch", str(tmp_path / "f")],
        input=diff.encode(),
        check=True,
    )
    return (tmp_path / "f").read_text()


def make(rng: random.Random) -> str:
    text = "".join(rng.choice("abcde") + "\n" for _ in range(rng.randrange(0, 40)))
    return text + rng.choice(["", "tail"])  # sometimes no newline at the end


@pytest.mark.parametrize("match_limit", [4_000_000, 0], ids=["matched", "wholly-replaced"])
def test_random_diffs_apply_with_patch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, match_limit: int
) -> None:
    monkeypatch.setattr(diffs, "_MATCH_LIMIT", match_limit)
    rng = random.Random(7)
    for _ in range(60):
        old, new = make(rng), make(rng)
        a, b = diffs.lines(old.encode()), diffs.lines(new.encode())
        assert a is not None
        assert b is not None
        diff, cut = diffs.unified(a, b, "a/f", "b/f", 1 << 20)
        assert not cut
        if old == new:
            assert diff == ""
        else:
            assert apply(diff, old, tmp_path) == new


def test_distant_changes_get_their_own_hunks() -> None:
    a = [f"{i}\n" for i in range(30)]
    b = a.copy()
    b[2], b[25] = "two\n", "twenty-five\n"
    diff, _ = diffs.unified(a, b, "a/f", "b/f", 1 << 20)
    assert [line for line in diff.splitlines() if line.startswith("@@")] == [
        "@@ -1,6 +1,6 @@",
        "@@ -23,7 +23,7 @@",
    ]


def test_a_diff_is_cut_at_a_line_within_the_cap() -> None:
    diff, cut = diffs.unified(["x\n"] * 100, ["y\n"] * 100, "a/f", "b/f", 50)
    assert cut
    assert len(diff) <= 50
    assert diff.endswith("\n")


def test_files_too_different_to_match_in_time_are_shown_wholly_replaced() -> None:
    # Lines repeated often, yet each too rare for difflib to drop as "popular": its slow case.
    rng = random.Random(1)
    a = [f"{rng.randrange(150)}\n" for _ in range(60_000)]
    b = ["same\n", *(f"{rng.randrange(150)}\n" for _ in range(60_000)), "same\n"]
    a = ["same\n", *a, "same\n"]
    began = time.monotonic()
    diff, _ = diffs.unified(a, b, "a/f", "b/f", 1 << 30)
    assert time.monotonic() - began < 2
    _header, hunk, *_body = diff.split("\n@@")
    assert hunk.startswith(" -1,60002 +1,60002 @@\n same\n")
    assert hunk.count("\n-") == hunk.count("\n+") == 60_000


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", []),
        (b"a\nb", ["a\n", "b"]),
        (b"a\r\nb\n", ["a\r\n", "b\n"]),
        (b"a\0b\n", None),
        (b"\xff\n", None),
    ],
)
def test_lines(data: bytes, expected: list[str] | None) -> None:
    assert diffs.lines(data) == expected
