"""Open gate.html in a real headless browser (Debian's chromium), screenshot it, check what rendered.

Skipped where /usr/bin/chromium is absent (`apt-get install -y chromium` provides it).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stagewise.report import write_gate_report
from test_report import make_summary

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium (apt-get install -y chromium)")


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def near(rgb: tuple, hex_color: str, tol: int = 12) -> bool:
    want = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return all(abs(a - b) <= tol for a, b in zip(rgb[:3], want))


@pytest.mark.parametrize("passed, banner, other", [(True, "#1a7f37", "#cf222e"), (False, "#cf222e", "#1a7f37")])
def test_gate_html_renders_verdict_and_plots_in_chromium(tmp_path, passed, banner, other):
    from PIL import Image

    _, page = write_gate_report(tmp_path / "report", make_summary(passed_gate=passed))
    shot = tmp_path / "shot.png"
    proc = chromium(tmp_path, "--window-size=1200,2600", f"--screenshot={shot}", page.as_uri())
    assert shot.exists(), proc.stderr[-2000:]

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2600)
    # The verdict banner is the first thing on the page, in the verdict's colour.
    top = [img.getpixel((x, y)) for x in range(100, 1100, 50) for y in range(35, 80, 10)]
    assert sum(near(p, banner) for p in top) > 0.6 * len(top)      # the rest is the white headline text
    assert not any(near(p, other) for p in top)
    # The embedded PNG plots were decoded and painted: the plots' blue occurs nowhere else on the page.
    blue = sum(near(img.getpixel((x, y)), "#0969da", 20) for x in range(0, 1200, 4) for y in range(0, 2600, 4))
    assert blue > 500

    dom = chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    verdict = "PROMOTED: stagewise v2 is the champion" if passed else "NOT PROMOTED: stagewise v2 stays challenger"
    assert verdict in dom and dom.count("<img") == 4 and "Contamination found in training data" in dom
