"""French→English parallel corpus from Debian's LibreOffice help pages (technical domain, MPL-2.0).

``libreoffice-help-fr`` and ``libreoffice-help-en-us`` install the same HTML files per language under
``/usr/share/libreoffice/help/{fr,en-US}/text/…``; every paragraph carries an id (``<p id="par_id3146060">``)
that is identical in both languages, so pairing is exact, not aligned by a model.  The packages are fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` (nothing is installed).

Kept: elements whose id starts with ``par_id`` (paragraphs, table cells, list items) found exactly once in both
files (ids repeated inside a file, e.g. embedded snippets, are dropped as ambiguous). Dropped: pairs whose French
side equals the English side (untranslated), pairs with fewer than ``--min-words`` words on either side, and
duplicates of an earlier pair (the same snippet is embedded in many pages).  Split: by whole HTML file
(a stable hash of the path: ~3 % of files test, ~2 % validation), so no page is in two splits.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

PACKAGES = ("libreoffice-help-en-us", "libreoffice-help-fr")
LANG_DIRS = {"en": "en-US", "fr": "fr"}
HELP_ROOT = Path("usr/share/libreoffice/help")
ID_PATTERN = re.compile(r"^par_id")
_VOID = {"br", "img", "input", "meta", "link", "hr", "wbr", "source", "col", "area", "base", "embed", "param",
         "track"}
_SPACES = re.compile(r"\s+")


class _ParagraphParser(HTMLParser):
    """Collect the text of every element whose ``id`` matches :data:`ID_PATTERN` (nested markup flattened)."""

    def __init__(self, pattern=ID_PATTERN):
        super().__init__(convert_charrefs=True)
        self.pattern = pattern
        self.found: list[tuple[str, str]] = []
        self._open: list[list] = []  # [id, tag, depth, parts]

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag == "br":
                self._text(" ")
            return
        for rec in self._open:
            if rec[1] == tag:
                rec[2] += 1
        ident = dict(attrs).get("id")
        if ident and self.pattern.match(ident):
            self._open.append([ident, tag, 1, []])

    def handle_startendtag(self, tag, attrs):
        if tag == "br":
            self._text(" ")

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        for rec in list(self._open):
            if rec[1] == tag:
                rec[2] -= 1
                if rec[2] == 0:
                    self._open.remove(rec)
                    self.found.append((rec[0], _SPACES.sub(" ", "".join(rec[3])).strip()))

    def handle_data(self, data):
        self._text(data)

    def _text(self, data):
        for rec in self._open:
            rec[3].append(data)


def paragraphs(html: str) -> dict[str, str]:
    """``{id: text}`` for ids that occur exactly once in the page."""
    parser = _ParagraphParser()
    parser.feed(html)
    parser.close()
    counts: dict[str, int] = {}
    for ident, _ in parser.found:
        counts[ident] = counts.get(ident, 0) + 1
    return {ident: text for ident, text in parser.found if counts[ident] == 1}


def _normalised(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.lower())


def split_of(relpath: str) -> str:
    bucket = int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16) % 100
    return "test" if bucket < 3 else "valid" if bucket < 5 else "train"


def extract_pairs(help_root: Path, min_words: int = 3):
    """Pair French and English paragraphs of the same page by id; return (splits, counters)."""
    fr_root, en_root = help_root / LANG_DIRS["fr"], help_root / LANG_DIRS["en"]
    if not fr_root.is_dir() or not en_root.is_dir():
        raise FileNotFoundError(f"{help_root} must hold {LANG_DIRS['fr']}/ and {LANG_DIRS['en']}/ help folders")
    counters = {"files": 0, "ids": 0, "untranslated": 0, "short": 0, "duplicate": 0, "kept": 0}
    splits = {"train": [], "valid": [], "test": []}
    seen = set()
    for en_path in sorted(en_root.rglob("*.html")):
        rel = en_path.relative_to(en_root).as_posix()
        fr_path = fr_root / rel
        if not fr_path.is_file():
            continue
        counters["files"] += 1
        en = paragraphs(en_path.read_text(encoding="utf-8", errors="replace"))
        fr = paragraphs(fr_path.read_text(encoding="utf-8", errors="replace"))
        for ident in sorted(set(en) & set(fr)):
            counters["ids"] += 1
            src, tgt = fr[ident], en[ident]
            if _normalised(src) == _normalised(tgt):
                counters["untranslated"] += 1
                continue
            if len(src.split()) < min_words or len(tgt.split()) < min_words:
                counters["short"] += 1
                continue
            if (src, tgt) in seen:
                counters["duplicate"] += 1
                continue
            seen.add((src, tgt))
            counters["kept"] += 1
            splits[split_of(rel)].append((f"{rel}#{ident}", src, tgt))
    return splits, counters


def fetch_help(cache_dir: Path) -> Path:
    """apt-get download + dpkg-deb -x both help packages into ``cache_dir``; return the unpacked help root."""
    unpacked = cache_dir / "libreoffice-help"
    root = unpacked / HELP_ROOT
    if (root / "fr").is_dir() and (root / "en-US").is_dir():
        return root
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        if not glob.glob(str(debs / f"{pkg}_*.deb")):
            print(f"apt-get download {pkg}", file=sys.stderr, flush=True)
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        for pkg in PACKAGES:
            deb = sorted(glob.glob(str(debs / f"{pkg}_*.deb")))[-1]
            subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
        if unpacked.exists():
            subprocess.run(["rm", "-rf", str(unpacked)], check=True)
        os.replace(tmp, unpacked)
        os.makedirs(tmp)  # TemporaryDirectory wants to delete something
    return root


def _subsample(items, n, seed):
    if not n or n >= len(items):
        return items
    import random

    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--help-root", type=Path, help="an unpacked help folder holding fr/ and en-US/ (default: "
                                                  "download the Debian packages into the cache)")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("STRUCTATTN_CACHE", Path.home() / ".cache" / "structattn")))
    p.add_argument("--min-words", type=int, default=3)
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--max-valid", type=int, default=0)
    p.add_argument("--max-test", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.min_words < 1:
        p.error("--min-words must be >= 1")
    root = args.help_root if args.help_root else fetch_help(args.cache_dir)
    splits, counters = extract_pairs(root, args.min_words)
    limits = {"train": args.max_train, "valid": args.max_valid, "test": args.max_test}
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = {}
    for i, (split, items) in enumerate(splits.items()):
        items = _subsample(items, limits[split], args.seed + i)
        pairs[split] = len(items)
        with open(args.out / f"{split}.fr", "w", encoding="utf-8") as f_fr, \
                open(args.out / f"{split}.en", "w", encoding="utf-8") as f_en, \
                open(args.out / f"{split}.ids", "w", encoding="utf-8") as f_id:
            for ident, src, tgt in items:
                f_id.write(ident + "\n")
                f_fr.write(src + "\n")
                f_en.write(tgt + "\n")
    if not pairs["test"] or not pairs["train"]:
        p.error(f"too few pairs extracted from {root}: {counters}")
    debs = sorted(Path(d).name for d in glob.glob(str(args.cache_dir / "debs" / "*.deb"))) if not args.help_root else []
    info = {"corpus": "libreoffice", "packages": list(PACKAGES), "debs": debs,
            "help_root": str(root), "license": "MPL-2.0", "pairs": pairs,
            "counters": counters, "min_words": args.min_words, "limits": limits,
            "split": "by HTML file: sha1(path) % 100 < 3 test, < 5 valid"}
    (args.out / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({"pairs": pairs, **counters}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
