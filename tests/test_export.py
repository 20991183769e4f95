"""structattn.export: round trip of the dump format, and that unfinished or damaged files are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from structattn.export import (
    AttentionRecord,
    DumpError,
    DumpWriter,
    IncompleteDumpError,
    decode_matrix,
    encode_matrix,
    read_dump,
    write_dump,
)


def _record(i, rank=0, T=3, S=4, seed=0, sparse=False):
    rng = np.random.default_rng(seed + 100 * i + rank)
    a = rng.random((T, S)).astype(np.float32)
    if sparse:
        a[a < 0.7] = 0
    return AttentionRecord(
        id=i, nbest_rank=rank, src_tokens=[f"s{j}" for j in range(S - 1)] + ["</s>"],
        tgt_tokens=[f"t{j}" for j in range(T - 1)] + ["</s>"], src_text=f"src {i} «é»", hyp_text=f"hyp {i}",
        attention=a, score=-0.5 * i - rank, extra={"pad_mass": 0.0, "note": [1, 2]},
    )


@pytest.mark.parametrize("kind", ["dense", "sparse", "tiny", "empty_rows", "zero_size"])
def test_matrix_encoding_is_bit_exact(kind):
    rng = np.random.default_rng(1)
    a = rng.random((7, 9)).astype(np.float32)
    if kind == "sparse":
        a[a < 0.85] = 0
    elif kind == "tiny":
        a = np.array([[1e-38, 1e-45, 0.0, 3.4e38], [np.float32(1 / 3), -0.0, 0.0, 1.0]], dtype=np.float32)
    elif kind == "empty_rows":
        a[[0, 3]] = 0
        a[:, 2] = 0
        a[a < 0.8] = 0
    elif kind == "zero_size":
        a = np.zeros((0, 5), dtype=np.float32)
    enc = encode_matrix(a)
    assert enc["encoding"] == ("csr" if kind in ("sparse", "empty_rows") else "dense")
    b = decode_matrix(json.loads(json.dumps(enc)))
    assert b.dtype == np.float32 and b.shape == a.shape
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))  # bit-exact, subnormals and -0.0 included


def test_round_trip_sorted_with_metadata_and_summary(tmp_path):
    path = tmp_path / "d.jsonl"
    recs = [_record(2, 1), _record(0), _record(2, 0, T=5, S=2, sparse=True), _record(1, sparse=True)]
    write_dump(path, {"arch": "x", "nested": {"a": [1, 2.5]}, "fn": print}, recs, summary={"n": 3})
    meta, got = read_dump(path)
    assert meta["arch"] == "x" and meta["nested"] == {"a": [1, 2.5]} and meta["summary"] == {"n": 3}
    assert [(r.id, r.nbest_rank) for r in got] == [(0, 0), (1, 0), (2, 0), (2, 1)]
    by = {(r.id, r.nbest_rank): r for r in recs}
    for r in got:
        o = by[(r.id, r.nbest_rank)]
        assert np.array_equal(r.attention, o.attention)
        assert (r.src_tokens, r.tgt_tokens, r.src_text, r.hyp_text, r.score) == (
            o.src_tokens, o.tgt_tokens, o.src_text, o.hyp_text, o.score)
        assert r.extra == o.extra and r["pad_mass"] == 0.0 and r["id"] == o.id
    _, unsorted = read_dump(path, sort=False)
    assert [(r.id, r.nbest_rank) for r in unsorted] == [(2, 1), (0, 0), (2, 0), (1, 0)]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_empty_dump_is_complete(tmp_path):
    write_dump(tmp_path / "e.jsonl", {}, [])
    meta, recs = read_dump(tmp_path / "e.jsonl")
    assert recs == [] and meta["summary"] == {}


def test_writer_rejects_bad_records(tmp_path):
    with DumpWriter(tmp_path / "x.jsonl", {}) as w:
        bad = _record(0)
        bad.attention = bad.attention[:, :-1]
        with pytest.raises(DumpError, match="does not match"):
            w.write(bad)
        nan = _record(1)
        nan.attention[0, 0] = np.nan
        with pytest.raises(DumpError, match="non-finite"):
            w.write(nan)
        w.write(_record(2))
    assert [r.id for r in read_dump(tmp_path / "x.jsonl")[1]] == [2]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DumpWriter(tmp_path / "missing_dir" / "x.jsonl")
    w = DumpWriter(tmp_path / "y.jsonl")
    with pytest.raises(RuntimeError, match="write_header"):
        w.write(_record(0))
    w.abort()


def test_exception_inside_writer_leaves_nothing(tmp_path):
    path = tmp_path / "d.jsonl"
    write_dump(path, {"old": True}, [_record(0)])
    with pytest.raises(KeyError):
        with DumpWriter(path, {"new": True}) as w:
            w.write(_record(1))
            w.flush()
            assert os.path.exists(w.tmp_path)
            raise KeyError("boom")
    assert not list(tmp_path.glob("*.tmp-*"))
    assert read_dump(path)[0]["old"] is True  # the writer never touches the destination before finalising


def _complete(tmp_path, n=5):
    path = tmp_path / "c.jsonl"
    write_dump(path, {"m": 1}, [_record(i, sparse=i % 2 == 0) for i in range(n)])
    return path, path.read_bytes()


def test_every_truncation_is_refused(tmp_path):
    path, data = _complete(tmp_path, n=3)
    cut = tmp_path / "cut.jsonl"
    for k in sorted(set(range(0, len(data), max(1, len(data) // 97))) | {len(data) - 1, len(data) - 2}):
        cut.write_bytes(data[:k])
        with pytest.raises(IncompleteDumpError):
            read_dump(cut)


def test_tampering_and_wrong_counts_are_refused(tmp_path):
    path, data = _complete(tmp_path)
    lines = data.split(b"\n")[:-1]
    bad = tmp_path / "bad.jsonl"
    # a record line removed: count mismatch
    bad.write_bytes(b"\n".join(lines[:2] + lines[3:]) + b"\n")
    with pytest.raises(IncompleteDumpError, match="announces 5 records"):
        read_dump(bad)
    # a value changed: digest mismatch
    rec = json.loads(lines[1])
    rec["hyp_text"] = "changed"
    bad.write_bytes(b"\n".join([lines[0], json.dumps(rec).encode()] + lines[2:]) + b"\n")
    with pytest.raises(IncompleteDumpError, match="checksum"):
        read_dump(bad)
    # footer without its records (a crash after the header, then someone appends a footer): count mismatch
    bad.write_bytes(lines[0] + b"\n" + lines[-1] + b"\n")
    with pytest.raises(IncompleteDumpError):
        read_dump(bad)
    bad.write_bytes(b'{"format": "something-else", "version": 1}\n')
    with pytest.raises(DumpError, match="not a structattn attention dump"):
        read_dump(bad)
    bad.write_bytes(data.replace(b'"version":1', b'"version":99', 1))
    with pytest.raises(DumpError, match="unsupported dump version"):
        read_dump(bad)
    bad.write_bytes(b"\xff\xfe not json\n")
    with pytest.raises(DumpError):
        read_dump(bad)


def test_duplicate_records_are_refused(tmp_path):
    write_dump(tmp_path / "dup.jsonl", {}, [_record(1), _record(1)])
    with pytest.raises(DumpError, match="duplicate"):
        read_dump(tmp_path / "dup.jsonl")


def test_killed_writer_process_leaves_only_a_refused_temp_file(tmp_path):
    """SIGKILL in the middle of writing: the destination never appears, the temporary file is refused."""
    path = tmp_path / "k.jsonl"
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        from structattn.export import DumpWriter
        w = DumpWriter({str(path)!r}, {{"x": 1}})
        for i in range(100000):
            w.write(dict(id=i, nbest_rank=0, src_tokens=["a", "</s>"], tgt_tokens=["b", "</s>"], src_text="a",
                         hyp_text="b", attention=np.eye(2, dtype=np.float32), score=0.0))
            w.flush()
            if i == 3:
                print("ready", flush=True)
            time.sleep(0.001)
        w.finalize()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not path.exists()
    tmps = list(tmp_path.glob("k.jsonl.tmp-*"))
    assert len(tmps) == 1
    with pytest.raises(IncompleteDumpError, match="no completion footer"):
        read_dump(tmps[0])
