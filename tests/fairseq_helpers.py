"""Helpers for the fairseq plugin tests: toy data, the real fairseq CLIs through subprocess, log parsing."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = ROOT / "structattn_fairseq"

# (name, extra fairseq-train arguments) of the attention variants: the paper's four, then the structured and sparse
# attentions beside them (each at its default λ / γ).
VARIANTS = [
    ("softmax", ["--attention", "softmax"]),
    ("sparsemax", ["--attention", "sparsemax"]),
    ("viterbi-entropy", ["--attention", "viterbi", "--attention-reg", "entropy"]),
    ("viterbi-l2", ["--attention", "viterbi", "--attention-reg", "l2"]),
    ("fusedmax", ["--attention", "fusedmax"]),
    ("oscarmax", ["--attention", "oscarmax"]),
    ("entmax15", ["--attention", "entmax15"]),
    ("sparsemap", ["--attention", "sparsemap"]),
]
#: the variants added after the paper's four: the end-to-end tests train them for fewer updates (CI time)
LATER_VARIANTS = ("fusedmax", "oscarmax", "entmax15", "sparsemap")


def make_toy_data(raw: Path, task: str = "reverse", n_train: int = 600, n_valid: int = 60, n_test: int = 12,
                  vocab: int = 10, min_len: int = 3, max_len: int = 7, seed: int = 0) -> dict:
    """Write {train,valid,test}.{src,tgt}: random token sequences and their copy or reversal. Returns statistics
    of the target side (unigram entropy in bits per target token, EOS included) for loss thresholds."""
    if task not in ("copy", "reverse"):
        raise ValueError(task)
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    raw.mkdir(parents=True, exist_ok=True)
    counts = Counter()
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        src_lines, tgt_lines = [], []
        for _ in range(n):
            sent = [rng.choice(words) for _ in range(rng.randint(min_len, max_len))]
            tgt = sent if task == "copy" else sent[::-1]
            src_lines.append(" ".join(sent))
            tgt_lines.append(" ".join(tgt))
            if split == "train":
                counts.update(tgt + ["</s>"])
        (raw / f"{split}.src").write_text("\n".join(src_lines) + "\n")
        (raw / f"{split}.tgt").write_text("\n".join(tgt_lines) + "\n")
    total = sum(counts.values())
    entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
    return {"unigram_entropy_bits": entropy}


def cli_env() -> dict:
    """The environment for the CLIs: one thread (CI has 2 shared cores) and, on purpose, none of the variables
    that would switch torch.load back to weights_only=False: checkpoints must load without them."""
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    return env


def run_cli(name: str, *args, cwd=None, check: bool = True, timeout: int = 600, stdin: str | None = None):
    """Run ``python -m fairseq_cli.<name> args…`` with the test interpreter; raise with the output on failure."""
    cmd = [sys.executable, "-m", f"fairseq_cli.{name}", *[str(a.resolve() if isinstance(a, Path) else a) for a in args]]
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout,
                          input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def run_clis(commands, jobs: int = 2, **kw) -> list:
    """Run several ``run_cli(name, *args)`` side by side, ``jobs`` at a time (each CLI is one thread, see
    :func:`cli_env`; CI has 2 cores): ``commands`` is a list of (name, args) pairs; returns the processes in the
    order given. Keyword arguments go to every :func:`run_cli`."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run_cli, name, *args, **kw) for name, args in commands]
        return [f.result() for f in futures]


def preprocess(raw: Path, dest: Path):
    return run_cli(
        "preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", raw / "train",
        "--validpref", raw / "valid", "--testpref", raw / "test", "--destdir", dest, "--joined-dictionary",
        "--workers", "1",
    )


def train_args(data: Path, save_dir: Path, variant_args, max_update: int, extra=()) -> list:
    """fairseq-train arguments for a tiny CPU model (embed 32, hidden 32)."""
    return [
        data, "--user-dir", USER_DIR, "--arch", "structattn_lstm", *variant_args,
        "--encoder-embed-dim", "32", "--encoder-hidden-size", "32", "--decoder-embed-dim", "32",
        "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32", "--dropout", "0.0",
        "--optimizer", "adam", "--lr", "0.01", "--clip-norm", "1.0", "--batch-size", "32",
        "--max-update", str(max_update), "--save-dir", save_dir, "--seed", "1", "--cpu", "--num-workers", "0",
        "--no-progress-bar", "--log-format", "json", "--log-interval", "10", "--no-epoch-checkpoints",
        "--criterion", "cross_entropy", *[str(e) for e in extra],
    ]


def train(data: Path, save_dir: Path, variant_args, max_update: int, extra=()):
    return run_cli("train", *train_args(data, save_dir, variant_args, max_update, extra))


_JSON = re.compile(r"\|\s*(train_inner|valid|train)\s*\|\s*(\{.*\})\s*$")


def parse_log(text: str) -> dict:
    """{'train_inner': [...], 'valid': [...], 'train': [...]} of the JSON records of a fairseq-train log."""
    out = {"train_inner": [], "valid": [], "train": []}
    for line in text.splitlines():
        m = _JSON.search(line)
        if m:
            out[m.group(1)].append(json.loads(m.group(2)))
    return out


def hypotheses(generate_stdout: str) -> dict:
    """{sentence id: hypothesis string} from fairseq-generate's H- lines."""
    hyps = {}
    for line in generate_stdout.splitlines():
        if line.startswith("H-"):
            idx, _score, text = (line.split("\t") + ["", ""])[:3]
            hyps[int(idx[2:])] = text
    return hyps


# ---- in-process model tests: a toy dictionary, random sentences, padded batches ----------------------------------


def toy_dictionary(n: int = 12):
    """A fairseq Dictionary with the 4 specials and the symbols w0 … w{n-1}."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}")
    return d


def random_sentences(d, lengths, seed: int = 1) -> list:
    """Random token tensors of the given lengths, each ending with EOS."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(d.nspecial, len(d), (L - 1,), generator=g), torch.tensor([d.eos()])])
            for L in lengths]


def pad_batch(d, sents, layout: str):
    """(src_tokens, src_lengths) padded on the "left", the "right", or "mixed" (even rows left, odd rows right)."""
    import torch

    T = max(len(s) for s in sents)
    rows = []
    for i, s in enumerate(sents):
        pad = torch.full((T - len(s),), d.pad())
        left = layout == "left" or (layout == "mixed" and i % 2 == 0)
        rows.append(torch.cat([pad, s]) if left else torch.cat([s, pad]))
    return torch.stack(rows), torch.tensor([len(s) for s in sents])


def random_prev_output(d, B: int, U: int, seed: int = 2):
    """(B, U) random decoder inputs starting with EOS (fairseq's prev_output_tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prev = torch.randint(d.nspecial, len(d), (B, U), generator=g)
    prev[:, 0] = d.eos()
    return prev
