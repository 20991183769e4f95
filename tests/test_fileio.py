"""structattn.fileio: the one write-then-rename used by every writer in the package."""

import os

import pytest

from structattn.fileio import atomic_path, atomic_write, temp_path


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_write(target) as fh:
        fh.write("new «é»")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text(encoding="utf-8") == "new «é»"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, "wb", fsync=True) as fh:
            fh.write(b"half")
            raise RuntimeError("boom")
    assert target.read_text(encoding="utf-8") == "new «é»"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]  # no temporary file left behind


def test_atomic_path_names_a_sibling_and_cleans_up(tmp_path):
    target = tmp_path / "fig.png"
    with atomic_path(target) as tmp:
        assert tmp == temp_path(target) and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as fh:
            fh.write(b"png")
    assert target.read_bytes() == b"png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            open(tmp, "wb").close()
            raise KeyboardInterrupt
    assert target.read_bytes() == b"png" and not os.path.exists(temp_path(target))
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "a"):
            pass


def test_replace_dir_swaps_whole_folders(tmp_path):
    from structattn.fileio import replace_dir

    out = tmp_path / "report"
    for content, existing in (("first", None), ("second", "full"), ("third", "empty")):
        staging = tmp_path / f".stage-{content}"
        staging.mkdir()
        (staging / "index.html").write_text(content)
        if existing == "empty":
            for p in out.iterdir():
                p.unlink()
        replace_dir(str(staging), str(out))
        assert (out / "index.html").read_text() == content and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging or old folder left
