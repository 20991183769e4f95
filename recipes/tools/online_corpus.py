"""Raw text extraction for the online recipes (the downloads themselves are done by ``recipes/online_nmt.sh``).

* ``wmt14 DIR``: concatenate the WMT14 fr-en training corpora unpacked in ``DIR`` (Europarl v7, Common Crawl,
  News Commentary v9 — the parts of WMT14 small enough to download casually; the paper's exact "1M subset" from
  nmt-benchmark.net is no longer online) into ``train.{fr,en}``, skipping pairs with an empty side.
* ``iwslt14 DIR``: the IWSLT14 de-en TED data as fairseq's ``prepare-iwslt14.sh`` splits it: training text from
  ``train.tags.de-en.*`` without the XML meta lines, every 23rd pair held out for validation, and the
  concatenation of dev2010, tst2010, tst2011, tst2012 (and TEDX dev2012) as the test set.
"""
from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

WMT14_PARTS = (
    ("training/europarl-v7.fr-en", "europarl-v7"),
    ("commoncrawl.fr-en", "commoncrawl"),
    ("training/news-commentary-v9.fr-en", "news-commentary-v9"),
)
IWSLT14_TEST = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
                "IWSLT14.TED.tst2012")
_META = re.compile(r"^\s*<(url|talkid|keywords|speaker|reviewer|translator|title|description|doc|/doc|seekvideo)")
_SEG = re.compile(r"<seg[^>]*>(.*)</seg>")


def _read(path: Path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n") for line in f]


def wmt14_pairs(root: Path):
    for prefix, name in WMT14_PARTS:
        fr, en = root / f"{prefix}.fr", root / f"{prefix}.en"
        if not fr.is_file() or not en.is_file():
            raise FileNotFoundError(f"{name}: expected {fr} and {en} (run the download step)")
        src, tgt = _read(fr), _read(en)
        if len(src) != len(tgt):
            raise ValueError(f"{name}: {len(src)} French vs {len(tgt)} English lines")
        for s, t in zip(src, tgt):
            s, t = s.strip(), t.strip()
            if s and t:
                yield s, t


def iwslt_train_lines(path: Path):
    return [line.strip() for line in _read(path) if not _META.match(line)]


def iwslt_xml_segments(path: Path):
    return [html.unescape(m.group(1).strip()) for m in map(_SEG.search, _read(path)) if m]


def iwslt14_splits(root: Path, src: str = "de", tgt: str = "en"):
    pair = f"{src}-{tgt}" if (root / f"train.tags.{src}-{tgt}.{src}").is_file() else f"{tgt}-{src}"
    s = iwslt_train_lines(root / f"train.tags.{pair}.{src}")
    t = iwslt_train_lines(root / f"train.tags.{pair}.{tgt}")
    if len(s) != len(t):
        raise ValueError(f"IWSLT14 training text: {len(s)} {src} vs {len(t)} {tgt} lines")
    pairs = [(a, b) for a, b in zip(s, t) if a and b]
    splits = {"train": [p for i, p in enumerate(pairs) if i % 23 != 0],
              "valid": [p for i, p in enumerate(pairs) if i % 23 == 0], "test": []}
    for name in IWSLT14_TEST:
        a = iwslt_xml_segments(root / f"{name}.{pair}.{src}.xml")
        b = iwslt_xml_segments(root / f"{name}.{pair}.{tgt}.xml")
        if len(a) != len(b):
            raise ValueError(f"{name}: {len(a)} vs {len(b)} segments")
        splits["test"] += list(zip(a, b))
    return splits


def _write(pairs, out: Path, split: str, src: str, tgt: str):
    with open(out / f"{split}.{src}", "w", encoding="utf-8") as fs, \
            open(out / f"{split}.{tgt}", "w", encoding="utf-8") as ft:
        for a, b in pairs:
            fs.write(a.replace("\n", " ") + "\n")
            ft.write(b.replace("\n", " ") + "\n")
    return len(pairs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", choices=("wmt14", "iwslt14"))
    p.add_argument("root", type=Path, help="folder with the unpacked download")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.corpus == "wmt14":
        n = _write(wmt14_pairs(args.root), args.out, "train", "fr", "en")
        print(f"train: {n} pairs", file=sys.stderr)
    else:
        for split, pairs in iwslt14_splits(args.root).items():
            print(f"{split}: {_write(pairs, args.out, split, 'de', 'en')} pairs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
