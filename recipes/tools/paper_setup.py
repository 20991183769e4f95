"""The paper's NMT set-up (Mensch & Blondel 2018, App. C.3) expressed as fairseq options, plus corpus selection.

App. C.3 trains with OpenNMT-py: "SGD training with s=1 learning rate, decaying from epoch 8 to epoch 15 with rate
0.65, batch size of size 256"; "training sentences of lengths superior to 50 are ignored, and translated sentences
are forced to a length inferior to 100".  In (legacy) OpenNMT-py the decay is applied after each epoch ``e`` with
``e >= start_decay_at``: epochs 1..8 run at lr 1, epoch 9 at 0.65, …, epoch 15 at 0.65**7 (:func:`opennmt_lr`).
fairseq's ``fixed`` scheduler gives epoch ``e >= force_anneal`` the rate ``lr * shrink ** (e + 1 - force_anneal)``,
so ``--force-anneal start_decay_at + 1`` reproduces it exactly (:func:`fairseq_flags`; tested against fairseq's
own scheduler).  OpenNMT-py additionally decays when validation perplexity goes up; fairseq cannot combine that
with a fixed schedule, and it is not reproduced.

Subcommands: ``flags`` prints the fairseq-train options; ``select`` keeps sentence pairs of at most N tokens per
side and draws a deterministic random subset (the paper's "1 million sentence subset of WMT14").
"""
from __future__ import annotations

import argparse
import random
import sys

PAPER = {"lr": 1.0, "decay": 0.65, "start_decay_at": 8, "epochs": 15, "batch_size": 256, "max_len": 50,
         "max_output_len": 100, "clip_norm": 5.0}  # γ: structattn.attention.PAPER_GAMMA


def opennmt_lr(epoch: int, lr: float = 1.0, decay: float = 0.65, start_decay_at: int = 8) -> float:
    """Learning rate of (legacy) OpenNMT-py during 1-based ``epoch`` (without its perplexity-triggered decay)."""
    if epoch < 1:
        raise ValueError(f"epoch must be >= 1, got {epoch}")
    rate = lr
    for finished in range(1, epoch):  # update_learning_rate(ppl, finished) runs after each finished epoch
        if finished >= start_decay_at:
            rate *= decay
    return rate


def fairseq_flags(lr: float = 1.0, decay: float = 0.65, start_decay_at: int = 8, epochs: int = 15,
                  batch_size: int = 256, clip_norm: float = 5.0) -> list[str]:
    """fairseq-train options that reproduce :func:`opennmt_lr` for ``epochs`` epochs of plain SGD."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if start_decay_at < 1 or epochs < 1 or batch_size < 1:
        raise ValueError("start_decay_at, epochs and batch_size must be >= 1")
    return ["--optimizer", "sgd", "--momentum", "0", "--lr", f"{lr:g}", "--lr-scheduler", "fixed",
            "--force-anneal", str(start_decay_at + 1), "--lr-shrink", f"{decay:g}", "--max-epoch", str(epochs),
            "--batch-size", str(batch_size), "--clip-norm", f"{clip_norm:g}"]


def select_pairs(src_lines, tgt_lines, max_len: int, n: int, seed: int):
    """Indices of pairs with 1..max_len whitespace tokens per side, then a random subset of ``n`` (0 = all),
    returned in corpus order."""
    keep = []
    for i, (s, t) in enumerate(zip(src_lines, tgt_lines, strict=True)):
        ls, lt = len(s.split()), len(t.split())
        if 0 < ls <= max_len and 0 < lt <= max_len:
            keep.append(i)
    if n and n < len(keep):
        keep = sorted(random.Random(seed).sample(keep, n))
    return keep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flags", help="print the paper's optimiser/schedule as fairseq-train options")
    f.add_argument("--lr", type=float, default=PAPER["lr"])
    f.add_argument("--decay", type=float, default=PAPER["decay"])
    f.add_argument("--start-decay-at", type=int, default=PAPER["start_decay_at"])
    f.add_argument("--epochs", type=int, default=PAPER["epochs"])
    f.add_argument("--batch-size", type=int, default=PAPER["batch_size"])
    s = sub.add_parser("select", help="length-filter and subsample a tokenised parallel corpus")
    s.add_argument("--src", required=True)
    s.add_argument("--tgt", required=True)
    s.add_argument("--out-src", required=True)
    s.add_argument("--out-tgt", required=True)
    s.add_argument("--max-len", type=int, default=PAPER["max_len"])
    s.add_argument("--n", type=int, default=1_000_000, help="pairs to keep (0 = all that pass the filter)")
    s.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.cmd == "flags":
        try:
            print(" ".join(fairseq_flags(args.lr, args.decay, args.start_decay_at, args.epochs, args.batch_size)))
        except ValueError as exc:
            p.error(str(exc))
        return 0
    if args.max_len < 1 or args.n < 0:
        p.error("--max-len must be >= 1 and --n >= 0")
    with open(args.src, encoding="utf-8") as fs, open(args.tgt, encoding="utf-8") as ft:
        src, tgt = fs.read().splitlines(), ft.read().splitlines()
    if len(src) != len(tgt):
        p.error(f"{args.src} has {len(src)} lines but {args.tgt} has {len(tgt)}")
    keep = select_pairs(src, tgt, args.max_len, args.n, args.seed)
    with open(args.out_src, "w", encoding="utf-8") as fs, open(args.out_tgt, "w", encoding="utf-8") as ft:
        for i in keep:
            fs.write(src[i] + "\n")
            ft.write(tgt[i] + "\n")
    print(f"kept {len(keep)} of {len(src)} pairs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
