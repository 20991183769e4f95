"""The HTML report rendered by a real headless browser (Debian's chromium): images load, heatmap colours show."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from structattn.export import AttentionRecord, write_dump
from structattn.report.cli import report_main

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def _chromium(tmp_path, url, *extra):
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    proc = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", *extra, url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rec(i, a):
    T, S = a.shape
    return AttentionRecord(id=i, nbest_rank=0, src_tokens=[f"s{j}" for j in range(S - 1)] + ["</s>"],
                           tgt_tokens=[f"t{j}" for j in range(T - 1)] + ["</s>"], src_text=f"source <{i}> & co",
                           hyp_text=f"hyp {i}", attention=a.astype(np.float32), score=-float(i))


@pytest.fixture
def report(tmp_path):
    rng = np.random.default_rng(0)
    dense, sparse = [], []
    for i in range(2):
        T, S = 6 + i, 8 + i
        d = rng.random((T, S))
        dense.append(_rec(i, d / d.sum(1, keepdims=True)))
        s = np.zeros((T, S))
        for t in range(T):
            s[t, t: t + 2] = [0.7, 0.3]
        sparse.append(_rec(i, s[:, :S]))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_dump(a, {"arch": "structattn_lstm", "attention": "softmax"}, dense)
    write_dump(b, {"arch": "structattn_lstm", "attention": "viterbi"}, sparse)
    rep = tmp_path / "report folder"  # a space in the path: file:// URL and relative links must cope
    assert report_main([f"softmax={a}", f"l2={b}", "-o", str(rep), "--title", "demo <report>"]) == 0
    return rep


def _dom(tmp_path, rep):
    proc = _chromium(tmp_path, (rep / "index.html").as_uri(), "--virtual-time-budget=10000", "--dump-dom")
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stdout[:2000]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    return proc.stdout, attrs


def test_report_renders_in_headless_chromium(tmp_path, report):
    import matplotlib
    import matplotlib.image as mpimg

    dom, attrs = _dom(tmp_path, report)
    assert attrs.get("data-images-total") == "4" and attrs.get("data-images-loaded") == "4", attrs
    assert "demo &lt;report&gt;" in dom and "source &lt;0&gt; &amp; co" in dom
    assert re.search(r'<div id="img-warning" hidden="">', dom)

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, (report / "index.html").as_uri(), f"--screenshot={shot}", "--window-size=1400,1600",
              "--virtual-time-budget=10000")
    img = (mpimg.imread(shot)[:, :, :3] * 255).round().astype(int)
    assert img.shape[:2] == (1600, 1400)
    # the page is not blank and shows heatmap cells: many pixels carry colours of the colour map
    lut = (np.array(matplotlib.colormaps["viridis_r"](np.linspace(0, 1, 256)))[:, :3] * 255).round().astype(int)
    px = img.reshape(-1, 3)[::3]
    saturated = px[(px.max(1) - px.min(1)) > 60]
    dist = np.abs(saturated[:, None, :] - lut[None, :, :]).max(-1).min(-1)
    assert (dist <= 6).sum() > 2000, (dist <= 6).sum()
    assert (px == 255).all(1).mean() > 0.2  # white page background and zero cells


def test_missing_images_are_reported_by_the_page(tmp_path, report):
    os.unlink(report / "img" / "s1_m1.png")
    dom, attrs = _dom(tmp_path, report)
    assert attrs.get("data-images-total") == "4" and attrs.get("data-images-loaded") == "3", attrs
    assert "1 of 4 images did not load" in dom
