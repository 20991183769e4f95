"""Attention dumps: a crash-safe, self-describing file of full attention matrices.

One dump holds, for every translated sentence and every n-best hypothesis kept, the attention matrix the
decoder used (target tokens × source tokens, EOS row and EOS column included) together with the tokens, texts
and the model/generation metadata. It is written by ``fairseq-generate --task structattn_translation
--dump-attention PATH`` (``structattn_fairseq/dump_task.py``) and read by :func:`read_dump`; this module does not import
fairseq.

Format (version 1): UTF-8 JSON Lines, one JSON object per line.

* line 1, header: ``{"format": "structattn-attention-dump", "version": 1, "metadata": {...}}``
* then one line per record: ``{"type": "record", "id": int, "nbest_rank": int, "src_tokens": [str],
  "tgt_tokens": [str], "src_text": str, "hyp_text": str, "score": float, "attention": ATT, "extra": {...}}``
* last line, footer: ``{"type": "end", "n_records": N, "sha256": HEX, "summary": {...}}`` where ``sha256`` is
  the digest of every byte before the footer line.

Multi-head models (``structattn_transformer``) dumped with ``--dump-attention-heads all`` add to each record
``"heads": [ATT, …]``, one matrix per head of the dumped layer (same shape as ``attention``, which is then their
mean), and to the header's metadata ``attention_layer``, ``attention_heads`` and ``num_heads``. The key is optional:
a record without it (every dump of a single-attention model, and of older versions) reads as ``heads = None``, and
readers that do not know it ignore it.

``ATT`` stores a float32 matrix bit-exactly, in whichever of two encodings is smaller:
``{"shape": [T, S], "encoding": "dense", "data": B64}`` (row-major little-endian float32) or
``{"shape": [T, S], "encoding": "csr", "indptr": B64, "indices": B64, "data": B64}`` (int32 / int32 / float32,
the non-zero cells of each row, so exact zeros stay exact zeros).

Crash safety (:mod:`structattn.fileio`): the writer writes to ``PATH.tmp-<pid>`` next to ``PATH`` and renames it onto ``PATH`` (atomic on
POSIX) only in :meth:`DumpWriter.finalize`. A reader accepts a file only if its footer is present, the record
count matches and the digest matches, so a killed writer never leaves anything :func:`read_dump` accepts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .fileio import discard, temp_path

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DEFAULT_EOS",
    "eos_symbol",
    "plain_options",
    "AttentionRecord",
    "DumpError",
    "IncompleteDumpError",
    "DumpWriter",
    "check_dump_destination",
    "read_dump",
    "write_dump",
    "encode_matrix",
    "decode_matrix",
]

FORMAT_NAME = "structattn-attention-dump"
FORMAT_VERSION = 1
#: End-of-sentence token of dumps whose header does not name one (``eos_symbol``): fairseq's.
DEFAULT_EOS = "</s>"


def plain_options(options) -> dict:
    """A model's options (a dict or an argparse-style namespace) as the JSON-friendly ``model_args`` of a dump
    header: scalars and lists of scalars, private (``_``) keys dropped, in the options' order."""
    items = options.items() if isinstance(options, dict) else vars(options).items()
    out = {}
    for k, v in items:
        if k.startswith("_"):
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
    return out


def eos_symbol(metadata: dict) -> str:
    """The end-of-sentence token of a dump, from its header (written by the fairseq task) or :data:`DEFAULT_EOS`."""
    return metadata.get("eos_symbol", DEFAULT_EOS)


class DumpError(ValueError):
    """The file is not a valid attention dump."""


class IncompleteDumpError(DumpError):
    """The file was not finished: its writer was killed or failed (no footer, wrong count or digest)."""


@dataclass
class AttentionRecord:
    """One hypothesis of one sentence.

    ``attention[i, j]`` is the weight that target position i (the step predicting ``tgt_tokens[i]``) put on
    source token ``src_tokens[j]``; both token lists end with the EOS symbol, padding is removed.
    ``score`` is fairseq's hypothesis score (natural log, length-normalised as in generation).
    ``extra`` holds optional fields (``src_bpe``, ``hyp_bpe``, ``ref_text``, ``positional_scores``,
    ``pad_mass``). ``heads`` (optional, multi-head models): (H, len(tgt_tokens), len(src_tokens)), head h's
    attention; ``attention`` is then their mean.
    """

    id: int
    nbest_rank: int
    src_tokens: list
    tgt_tokens: list
    src_text: str
    hyp_text: str
    attention: np.ndarray
    score: float
    extra: dict = field(default_factory=dict)
    heads: np.ndarray | None = None

    def __getitem__(self, key):
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        return self.extra[key]

    def validate(self) -> None:
        a = self.attention
        if not isinstance(a, np.ndarray) or a.ndim != 2:
            raise DumpError(f"record {self.id}/{self.nbest_rank}: attention must be a 2-D numpy array")
        if a.shape != (len(self.tgt_tokens), len(self.src_tokens)):
            raise DumpError(
                f"record {self.id}/{self.nbest_rank}: attention shape {a.shape} does not match "
                f"(len(tgt_tokens), len(src_tokens)) = ({len(self.tgt_tokens)}, {len(self.src_tokens)})"
            )
        if not np.all(np.isfinite(a)):
            raise DumpError(f"record {self.id}/{self.nbest_rank}: attention has non-finite values")
        h = self.heads
        if h is not None:
            if not isinstance(h, np.ndarray) or h.ndim != 3 or h.shape[1:] != a.shape or h.shape[0] < 1:
                raise DumpError(f"record {self.id}/{self.nbest_rank}: heads must be a numpy array of shape "
                                f"(H, {a.shape[0]}, {a.shape[1]}), got "
                                f"{h.shape if isinstance(h, np.ndarray) else type(h).__name__}")
            if not np.all(np.isfinite(h)):
                raise DumpError(f"record {self.id}/{self.nbest_rank}: heads have non-finite values")


# ---- matrix encoding -------------------------------------------------------------------------------------------


def _b64(arr: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode(
        "ascii"
    )


def _unb64(s: str, dtype: str, count: int) -> np.ndarray:
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise DumpError(f"bad base64 payload: {e}") from None
    dt = np.dtype(dtype).newbyteorder("<")
    if len(raw) != count * dt.itemsize:
        raise DumpError(f"payload holds {len(raw)} bytes, expected {count} {dtype} values")
    return np.frombuffer(raw, dtype=dt).astype(dtype)


def encode_matrix(a: np.ndarray) -> dict:
    """Encode a 2-D matrix as float32, picking dense or CSR by size (zeros stay exact)."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {a.shape}")
    T, S = a.shape
    nz = a != 0
    nnz = int(nz.sum())
    # dense costs 4 bytes a cell; CSR costs 8 bytes a non-zero plus 4 bytes a row
    if 8 * nnz + 4 * (T + 1) < 4 * T * S:
        rows, cols = np.nonzero(nz)
        indptr = np.zeros(T + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=T), out=indptr[1:])
        return {
            "shape": [T, S],
            "encoding": "csr",
            "indptr": _b64(indptr, "int32"),
            "indices": _b64(cols, "int32"),
            "data": _b64(a[rows, cols], "float32"),
        }
    return {"shape": [T, S], "encoding": "dense", "data": _b64(a, "float32")}


def decode_matrix(obj: dict) -> np.ndarray:
    """Inverse of :func:`encode_matrix`; returns a float32 array."""
    try:
        T, S = (int(x) for x in obj["shape"])
        enc = obj["encoding"]
    except (KeyError, TypeError, ValueError):
        raise DumpError("attention entry lacks a valid 'shape'/'encoding'") from None
    if T < 0 or S < 0:
        raise DumpError(f"negative attention shape {obj['shape']}")
    if enc == "dense":
        return _unb64(obj["data"], "float32", T * S).reshape(T, S).copy()
    if enc == "csr":
        indptr = _unb64(obj["indptr"], "int32", T + 1).astype(np.int64)
        nnz = int(indptr[-1]) if T + 1 > 0 else 0
        if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
            raise DumpError("csr attention has a non-monotone indptr")
        indices = _unb64(obj["indices"], "int32", nnz)
        data = _unb64(obj["data"], "float32", nnz)
        if nnz and (indices.min() < 0 or indices.max() >= S):
            raise DumpError("csr attention has column indices out of range")
        out = np.zeros((T, S), dtype=np.float32)
        rows = np.repeat(np.arange(T), np.diff(indptr))
        out[rows, indices] = data
        return out
    raise DumpError(f"unknown attention encoding {enc!r}")


# ---- writing ---------------------------------------------------------------------------------------------------


def _json_safe(x: Any) -> Any:
    """Keep what JSON can hold faithfully (drop callables/objects, map non-finite floats to strings)."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return _json_safe(float(x))
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items() if _json_safe_ok(v)}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x if _json_safe_ok(v)]
    return repr(x)


def _json_safe_ok(v: Any) -> bool:
    return not callable(v) or isinstance(v, (dict, list, tuple, str))


def check_dump_destination(path: str | os.PathLike, probe: bool = False) -> None:
    """Raise if ``path`` cannot receive an attention dump: :class:`IsADirectoryError` (a directory),
    :class:`FileNotFoundError` (its directory does not exist) or, with ``probe=True``, :class:`OSError` when a file
    cannot be created next to it. The probe creates and removes a file, so that read-only directories are caught
    whatever the permission bits say (root, ACLs, immutable or read-only mounts), before any work is done; an
    existing ``path`` is left untouched. The one check behind :class:`DumpWriter` and the plugins' command-line
    checks."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write attention dump {path!r}: it is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write attention dump {path!r}: directory {directory!r} does not exist")
    if probe:
        name = os.path.join(directory, f".{os.path.basename(path)}.probe-{os.getpid()}")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise OSError(f"cannot write attention dump {path!r}: cannot create files in {directory!r} "
                          f"({e.strerror})") from None
        os.close(fd)
        os.unlink(name)


class DumpWriter:
    """Stream records into ``path`` crash-safely (see the module docstring).

    Usage::

        with DumpWriter(path, metadata) as w:
            w.write(record)        # AttentionRecord or dict with the same fields
        # leaving the block normally finalises (footer + atomic rename); an exception aborts (temp file removed)

    The temporary file is created in the constructor, so an unwritable destination fails before any work.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict | None = None):
        self.path = os.fspath(path)
        check_dump_destination(self.path)
        self.tmp_path = temp_path(self.path)
        try:
            self._fh = open(self.tmp_path, "wb")
        except OSError as e:
            raise OSError(f"cannot write attention dump {self.path!r}: {e.strerror}") from None
        self._sha = hashlib.sha256()
        self.n_records = 0
        self.closed = False
        self._header_written = False
        self.summary: dict = {}
        if metadata is not None:
            self.write_header(metadata)

    def _emit(self, obj: dict, hashed: bool = True) -> None:
        line = (json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
        if hashed:
            self._sha.update(line)
        self._fh.write(line)

    def write_header(self, metadata: dict) -> None:
        if self.closed:
            raise RuntimeError("dump writer is closed")
        if self._header_written:
            raise RuntimeError("dump header already written")
        self._emit({"format": FORMAT_NAME, "version": FORMAT_VERSION, "metadata": _json_safe(dict(metadata))})
        self._header_written = True

    @property
    def header_written(self) -> bool:
        return self._header_written

    def write(self, record: AttentionRecord | dict) -> None:
        if self.closed:
            raise RuntimeError("dump writer is closed")
        if not self._header_written:
            raise RuntimeError("write_header() must come before the first record")
        if isinstance(record, dict):
            record = AttentionRecord(**record)
        record.validate()
        obj = {
            "type": "record",
            "id": int(record.id),
            "nbest_rank": int(record.nbest_rank),
            "src_tokens": [str(t) for t in record.src_tokens],
            "tgt_tokens": [str(t) for t in record.tgt_tokens],
            "src_text": str(record.src_text),
            "hyp_text": str(record.hyp_text),
            "score": _json_safe(float(record.score)),
            "attention": encode_matrix(record.attention),
            "extra": _json_safe(dict(record.extra)),
        }
        if record.heads is not None:  # only then: records without heads keep their exact bytes
            obj["heads"] = [encode_matrix(h) for h in record.heads]
        self._emit(obj)
        self.n_records += 1

    def flush(self) -> None:
        """Push written records to the OS (a crash then leaves them visible in the temp file)."""
        if not self.closed:
            self._fh.flush()

    def finalize(self, summary: dict | None = None) -> str:
        """Write the footer, fsync and atomically rename onto ``path``; returns ``path``."""
        if self.closed:
            raise RuntimeError("dump writer is closed")
        if not self._header_written:
            raise RuntimeError("cannot finalise a dump without a header")
        if summary:
            self.summary.update(summary)
        footer = {"type": "end", "n_records": self.n_records, "sha256": self._sha.hexdigest()}
        footer["summary"] = _json_safe(self.summary)
        self._emit(footer, hashed=False)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self.closed = True
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left untouched."""
        if self.closed:
            return
        self.closed = True
        try:
            self._fh.close()
        finally:
            discard(self.tmp_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and not self.closed:
            self.finalize()
        else:
            self.abort()
        return False


def write_dump(path, metadata: dict, records: Iterable[AttentionRecord | dict], summary: dict | None = None) -> str:
    """Write a complete dump in one call (crash-safe); returns ``path``."""
    with DumpWriter(path, metadata) as w:
        for r in records:
            w.write(r)
        return w.finalize(summary)


# ---- reading ---------------------------------------------------------------------------------------------------


def _loads(line: bytes, path: str, lineno: int) -> dict:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DumpError(f"{path}:{lineno}: not a JSON line ({e})") from None
    if not isinstance(obj, dict):
        raise DumpError(f"{path}:{lineno}: expected a JSON object")
    return obj


def read_dump(path: str | os.PathLike, sort: bool = True) -> tuple[dict, list[AttentionRecord]]:
    """Read a complete dump; returns ``(metadata, records)``.

    ``metadata`` is the header's metadata plus ``metadata["summary"]`` from the footer. Records are sorted by
    ``(id, nbest_rank)`` unless ``sort=False`` (then in generation order). Raises :class:`FileNotFoundError`,
    :class:`IncompleteDumpError` for an unfinished file and :class:`DumpError` for anything malformed.
    """
    path = os.fspath(path)
    lines = _complete_lines(path)
    header, footer = _checked_envelope(path, lines)
    records = [_parse_record(path, k, line) for k, line in enumerate(lines[1:-1], start=2)]
    _check_unique(path, records)
    if sort:
        records.sort(key=lambda r: (r.id, r.nbest_rank))
    metadata = dict(header.get("metadata") or {})
    metadata["summary"] = footer.get("summary") or {}
    return metadata, records


def _complete_lines(path: str) -> list[bytes]:
    """The file's lines; the writer ends every line, the footer included, with a newline, so a missing final
    newline means a cut-off write."""
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")  # never empty: b"".split(b"\n") == [b""]
    if lines[-1] != b"":
        raise IncompleteDumpError(f"{path}: truncated (no final newline); the writer did not finish")
    lines.pop()
    if not lines:
        raise IncompleteDumpError(f"{path}: empty file; the writer did not finish")
    return lines


def _checked_envelope(path: str, lines: list[bytes]) -> tuple[dict, dict]:
    """(header, footer) after checking the format, version, completion footer, record count and checksum."""
    header = _loads(lines[0], path, 1)
    if header.get("format") != FORMAT_NAME:
        raise DumpError(f"{path}: not a structattn attention dump (format={header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise DumpError(f"{path}: unsupported dump version {header.get('version')!r} (this reader: {FORMAT_VERSION})")
    footer = _loads(lines[-1], path, len(lines)) if len(lines) > 1 else {}
    if footer.get("type") != "end":
        raise IncompleteDumpError(
            f"{path}: no completion footer; the writer was killed or failed ({len(lines) - 1} record lines present)"
        )
    n_lines = len(lines) - 2
    if footer.get("n_records") != n_lines:
        raise IncompleteDumpError(f"{path}: footer announces {footer.get('n_records')} records, file has {n_lines}")
    sha = hashlib.sha256()
    for line in lines[:-1]:
        sha.update(line + b"\n")
    if sha.hexdigest() != footer.get("sha256"):
        raise IncompleteDumpError(f"{path}: checksum mismatch; the file was modified or corrupted")
    return header, footer


def _parse_record(path: str, k: int, line: bytes) -> AttentionRecord:
    """The validated record on line ``k`` (1-based); errors name the file and line."""
    obj = _loads(line, path, k)
    if obj.get("type") != "record":
        raise DumpError(f"{path}:{k}: unexpected entry type {obj.get('type')!r}")
    try:
        rec = AttentionRecord(
            id=int(obj["id"]),
            nbest_rank=int(obj["nbest_rank"]),
            src_tokens=list(obj["src_tokens"]),
            tgt_tokens=list(obj["tgt_tokens"]),
            src_text=obj["src_text"],
            hyp_text=obj["hyp_text"],
            attention=decode_matrix(obj["attention"]),
            score=float(obj["score"]),
            extra=dict(obj.get("extra") or {}),
            heads=_decode_heads(obj.get("heads")),
        )
        rec.validate()
    except KeyError as e:
        raise DumpError(f"{path}:{k}: record lacks field {e}") from None
    except DumpError as e:
        raise DumpError(f"{path}:{k}: {e}") from None
    return rec


def _decode_heads(heads) -> np.ndarray | None:
    """The optional per-head matrices of a record: None, or (H, T, S) float32."""
    if heads is None:
        return None
    if not isinstance(heads, list) or not heads:
        raise DumpError("'heads' must be a non-empty list of attention matrices")
    mats = [decode_matrix(h) for h in heads]
    if any(m.shape != mats[0].shape for m in mats):
        raise DumpError("'heads' matrices differ in shape")
    return np.stack(mats)


def _check_unique(path: str, records: list[AttentionRecord]) -> None:
    seen = set()
    for r in records:
        key = (r.id, r.nbest_rank)
        if key in seen:
            raise DumpError(f"{path}: duplicate record for sentence {r.id}, n-best rank {r.nbest_rank}")
        seen.add(key)
