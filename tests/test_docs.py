"""What the README and docs/ show works as written: every fenced `bash` / `sh` / `python` block runs.

Blocks are read with pytest-codeblocks' parser (`pytest_codeblocks.extract_from_file`); the HTML comment
on the line before a block decides how it runs. The convention, for anyone adding a snippet:

- no comment: the block runs in `make test`, in a fresh workspace (params.yaml, dvc.yaml, evals/ and a
  `.venv` pointing at this interpreter's venv), cwd = that workspace, `.venv/bin` first on PATH,
  bash with `set -euo pipefail`. It must pass in TIMEOUT_S seconds. A new snippet is covered by default.
- `<!--pytest.mark.workspace-->`: it needs a finished run. It runs in `.ci/run` (slow) in one smoke
  workspace (`stagewise run --profile smoke`) shared by every such block, in file order.
- `<!--pytest.mark.skip(reason="...")-->`: not run; the reason (a GPU, a cluster, the network, a
  long-lived server, minutes of pipeline, a synopsis with placeholders) is required and says where
  the behaviour is tested instead, if anywhere.

`test_every_snippet_is_run_or_says_why_not` fails on any other mark or a skip without a reason.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, docs_workspace, workspace_env

TIMEOUT_S = 300   # seconds; a cheap snippet takes ~10 s, a loaded 2-core machine makes that minutes
LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Snippet:
    page: Path
    lineno: int
    lang: str
    code: str
    marks: list[str]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.lineno}"

    @property
    def kind(self) -> str:
        if any(m.startswith("pytest.mark.skip") for m in self.marks):
            return "skip"
        return "workspace" if "pytest.mark.workspace" in self.marks else "fresh"


def snippets() -> list[Snippet]:
    from pytest_codeblocks import extract_from_file

    out = []
    for page in PAGES:
        for b in extract_from_file(page):
            lang = LANGS.get((b.syntax or "").strip().split(" ")[0])
            if lang:
                out.append(Snippet(page, b.lineno, lang, b.code, list(b.marks)))
    return out


ALL = snippets()


def of_kind(kind: str) -> list:
    return [pytest.param(s, id=s.id) for s in ALL if s.kind == kind]


def test_every_snippet_is_run_or_says_why_not():
    bad = []
    for s in ALL:
        for m in s.marks:
            if m == "pytest.mark.workspace":
                continue
            if not re.fullmatch(r"""pytest\.mark\.skip\(reason=(["']).{8,}\1\)""", m):
                bad.append(f"{s.id}: {m!r} (use pytest.mark.workspace or pytest.mark.skip(reason=\"...\"))")
        if len(s.marks) > 1:
            bad.append(f"{s.id}: more than one mark {s.marks}")
    assert not bad, "\n".join(bad)
    counts = {k: sum(s.kind == k for s in ALL) for k in ("fresh", "workspace", "skip")}
    print(f"\ndocs snippets: {len(ALL)} — run in make test {counts['fresh']}, run in a finished workspace "
          f"{counts['workspace']}, marked not run {counts['skip']}")


def run_snippet(s: Snippet, ws: Path, timeout: int = TIMEOUT_S) -> None:
    if s.lang == "bash":
        cmd = ["bash", "-c", "set -euo pipefail\n" + s.code]
    else:
        cmd = [str(ws / ".venv" / "bin" / "python"), "-c", s.code]
    try:
        proc = subprocess.run(cmd, cwd=ws, env=workspace_env(ws), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{s.id}: still running after {timeout} s — mark it pytest.mark.workspace or "
                    "pytest.mark.skip(reason=...) (tests/test_docs.py)")
    assert proc.returncode == 0, (f"{s.id} ({s.lang}) exited {proc.returncode}:\n{s.code}\n--- stdout\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")


@pytest.mark.parametrize("snippet", of_kind("fresh"))
def test_snippet_in_a_fresh_workspace(snippet, tmp_path):
    run_snippet(snippet, docs_workspace(tmp_path / "ws"))


@pytest.mark.slow
@pytest.mark.timeout(3600)   # the first one sets up the shared smoke run (minutes on a loaded machine)
@pytest.mark.parametrize("snippet", of_kind("workspace"))
def test_snippet_in_a_finished_smoke_workspace(snippet, finished_smoke_workspace):
    run_snippet(snippet, finished_smoke_workspace, timeout=900)
