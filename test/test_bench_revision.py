"""`ovseg bench --against REV`: this checkout against a git revision, alternating workers."""

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_CONFIG

from ovseg_ros.benchmarks.revision import format_against, parse_variant, run_against

REPO = Path(__file__).resolve().parents[1]


def _is_git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    return proc.returncode == 0


pytestmark = pytest.mark.skipif(not _is_git_checkout(), reason="needs a git checkout and git")


def test_parse_variant():
    assert parse_variant("precision=bf16, threads=1") == {"precision": "bf16", "threads": 1}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_variant("bf16")


def test_head_against_itself_labels_alike_and_reports_ratios():
    result = run_against(REPO, "HEAD", TINY_CONFIG, ["quantize=int8"], (32, 48), rounds=2)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["HEAD (start)", "this checkout", "quantize=int8"]
    assert rows["HEAD (start)"]["speedup_frame"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["segment_ms"] > 0 and r["overlay_ms"] > 0 and r["speedup_frame"] > 0
    # Same code, same frames: the committed revision and the working tree label alike (a
    # behaviour change not yet committed shows up here as well).
    assert result["labels"]["HEAD (start)"] == result["labels"]["this checkout"]
    assert "| quantize=int8 |" in format_against(result)
    worktrees = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True
    ).stdout
    assert "ovseg-rev-" not in worktrees  # the temporary checkout is removed


def test_unknown_revision_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot check out revision 'no-such-rev'"):
        run_against(REPO, "no-such-rev", TINY_CONFIG, [], (32, 48), rounds=1)


def test_cli_against_prints_the_table(capsys):
    from ovseg_ros.cli import main

    args = ["bench", "--against", "HEAD", "--variants", "threads=1", "--sizes", "48x32"]
    args += ["--repeats", "1", "--model", "ovseg-tiny", "--pretrained", "none"]
    args += ["--templates", "single", "--text-cache-dir", "none", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| HEAD (start) |" in out and "| threads=1 |" in out
