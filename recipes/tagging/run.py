"""Part-of-speech tagging with structured losses on Vit_Ω (ICML 2018 §4.2, on a corpus that installs offline).

Corpus: the Turkish Web Treebank (TWT, Google Research, Apache-2.0), shipped as CoNLL-U inside the PyPI wheel
``turkish-treebanks==1.0.0`` (``data/web.conllu`` and ``data/wiki.conllu``: 4,851 sentences, 81,370 tokens, 14
universal POS tags; tokens are the treebank's inflectional groups). The files are read where pip installed them
(their sha256 is checked, so every run trains on the same bytes); the package's own Python reader is not used (its
protobuf code no longer imports with current protobuf). Split: the package's rule (``read._sentence_is_in_split``):
in each file, sentence k is dev if k % 10 == 8, test if k % 10 == 9, train otherwise.

Model (§4.2 with a smaller encoder): word + 3-letter-suffix + shape embeddings → one BiLSTM layer → unary scores
w_iᵀx_t + b_i; potentials θ[t, i, j] = unary[t, i] + transition[i, j] for t ≥ 1 and θ[0, i, j] = unary[0, i] (§4.2's
θ_1). Trained with ℓ_{−H}, ℓ_{ℓ2} (structattn.ViterbiLoss) and the structured perceptron, same epochs and batches for
each; the epoch is chosen on dev accuracy; prediction is the hard Viterbi path (the MAP, eq. (4)) for every loss. γ is
fixed at 1: with a learned linear-chain θ the network can scale θ, so γ only rescales the initial potentials.

For the ℓ2 models, test sentences are also decoded with structattn.sparse_decode: how many tag sequences have a
non-zero probability, and their list for a few sentences.

    python recipes/tagging/run.py                         # 3 seeds × 3 losses, prints a Markdown table
    python recipes/tagging/run.py --seeds 0 --epochs 2    # quick look

Writes ``--out`` (default recipes/tagging/work/): results.json and, with ``--figure PATH``, a picture like the
paper's Figure 6.
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import structattn
from structattn import (
    ViterbiLoss,
    count_sequences,
    sequence_probability,
    sparse_decode,
    viterbi_decode,
    viterbi_marginals,
)

PACKAGE = "turkish-treebanks"
FILES = {
    "data/web.conllu": "d6f92b12b74f367a36e30dd3d644d7a0bb01a991584602e6e69f1191664f86bf",
    "data/wiki.conllu": "58f049fae8d0653ba0940a58168c17c7cebbc50f88cad2985d12d34ac1b9acde",
}
LOSSES = {"entropy": "entropy", "l2": "l2", "perceptron": None}


# ---- corpus ---------------------------------------------------------------------------------------------------


def locate_corpus() -> list[Path]:
    """The installed TWT CoNLL-U files, checked against their sha256."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"error: the corpus package is not installed: pip install '{PACKAGE}==1.0.0' "
                 f"(or pip install -e '.[tagging]')")
    paths = []
    for member, digest in FILES.items():
        found = [f for f in dist.files or () if str(f) == member]
        if not found:
            sys.exit(f"error: {PACKAGE} does not contain {member}")
        path = Path(found[0].locate())
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != digest:
            sys.exit(f"error: {path} has sha256 {got}, expected {digest} ({PACKAGE}==1.0.0)")
        paths.append(path)
    return paths


def read_conllu(text: str) -> list[list[tuple[str, str]]]:
    """Sentences as [(form, upos)], skipping comments, multi-word ranges (1-2) and empty nodes (1.1)."""
    sents, cur = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            if cur:
                sents.append(cur)
            cur = []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise ValueError(f"not a CoNLL-U token line (10 columns): {line!r}")
        if not cols[0].isdigit():
            continue
        cur.append((cols[1], cols[3]))
    if cur:
        sents.append(cur)
    return sents


def split_of(index: int) -> str:
    """The turkish-treebanks package's split rule (read._sentence_is_in_split)."""
    return "dev" if index % 10 == 8 else "test" if index % 10 == 9 else "train"


def load_splits(paths) -> dict[str, list]:
    out = {"train": [], "dev": [], "test": []}
    for path in paths:
        for k, sent in enumerate(read_conllu(Path(path).read_text(encoding="utf-8"))):
            out[split_of(k)].append(sent)
    return out


# ---- features and model ---------------------------------------------------------------------------------------


def shape(w: str) -> str:
    if any(c.isdigit() for c in w):
        return "num"
    if not any(c.isalpha() for c in w):
        return "punct"
    if w[0].isupper():
        return "Cap"
    return "low"


class Vocab:
    def __init__(self, items, min_count=1):
        counts = collections.Counter(items)
        self.itos = ["<pad>", "<unk>"] + sorted(w for w, c in counts.items() if c >= min_count)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    def __call__(self, w):
        return self.stoi.get(w, 1)


def build_vocabs(train):
    words = [w.lower() for s in train for w, _ in s]
    return {
        "word": Vocab(words, 2),
        "suffix": Vocab([w[-3:] for w in words], 2),
        "shape": Vocab(["num", "punct", "Cap", "low"]),
        "tag": sorted({t for s in train for _, t in s}),
    }


def encode(sents, vocabs):
    """Padded (B, T) feature tensors, tags (−100 at padding) and lengths."""
    B, T = len(sents), max(len(s) for s in sents)
    feats = {k: torch.zeros(B, T, dtype=torch.long) for k in ("word", "suffix", "shape")}
    tags = torch.full((B, T), -100, dtype=torch.long)
    tag_id = {t: i for i, t in enumerate(vocabs["tag"])}
    for b, s in enumerate(sents):
        for t, (w, tag) in enumerate(s):
            lw = w.lower()
            feats["word"][b, t] = vocabs["word"](lw)
            feats["suffix"][b, t] = vocabs["suffix"](lw[-3:])
            feats["shape"][b, t] = vocabs["shape"](shape(w))
            tags[b, t] = tag_id.get(tag, 0)  # a tag unseen in train (none in TWT) would count as an error
    return feats, tags, torch.tensor([len(s) for s in sents])


class Tagger(nn.Module):
    """BiLSTM + linear-chain potentials θ[t, i, j] = w_iᵀx_t + b_i + T_ij (t ≥ 1), θ[0, i, j] = w_iᵀx_0 + b_i."""

    def __init__(self, vocabs, emb=64, suffix_emb=32, hidden=64, dropout=0.3):
        super().__init__()
        S = len(vocabs["tag"])
        self.word = nn.Embedding(len(vocabs["word"]), emb, padding_idx=0)
        self.suffix = nn.Embedding(len(vocabs["suffix"]), suffix_emb, padding_idx=0)
        self.shape = nn.Embedding(len(vocabs["shape"]), 8, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(emb + suffix_emb + 8, hidden, batch_first=True, bidirectional=True)
        self.unary = nn.Linear(2 * hidden, S)
        self.transition = nn.Parameter(torch.zeros(S, S))

    def forward(self, feats, lengths):
        x = torch.cat([self.word(feats["word"]), self.suffix(feats["suffix"]), self.shape(feats["shape"])], -1)
        x = self.drop(x)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        h, _ = self.lstm(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])
        u = self.unary(self.drop(h))  # (B, T, S)
        theta = u[:, :, :, None] + self.transition[None, None]
        # step 0 has no previous tag: its potentials ignore j (the start state is free, see tags_to_path)
        theta = torch.cat([u[:, :1, :, None].expand(-1, 1, -1, u.shape[-1]), theta[:, 1:]], 1)
        return theta


# ---- training and evaluation ----------------------------------------------------------------------------------


def batches(data, size, gen=None):
    order = torch.randperm(len(data), generator=gen).tolist() if gen is not None else range(len(data))
    order = list(order)
    for k in range(0, len(order), size):
        yield [data[i] for i in order[k:k + size]]


def accuracy(model, enc_batches):
    model.eval()
    right = total = 0
    with torch.no_grad():
        for feats, tags, lengths in enc_batches:
            pred = viterbi_decode(model(feats, lengths), lengths)
            m = tags != -100
            right += int((pred[m] == tags[m]).sum())
            total += int(m.sum())
    return right / total


def train_one(loss_name, seed, splits, vocabs, args, log):
    torch.manual_seed(seed)
    model = Tagger(vocabs, hidden=args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    crit = ViterbiLoss(LOSSES[loss_name], args.gamma)
    gen = torch.Generator().manual_seed(seed)
    dev = [encode(b, vocabs) for b in batches(splits["dev"], 256)]
    best = (-1.0, 0, None)
    t0 = time.time()
    updates = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        for sents in batches(splits["train"], args.batch, gen):
            feats, tags, lengths = encode(sents, vocabs)
            loss = crit(model(feats, lengths), tags, lengths)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            updates += 1
        acc = accuracy(model, dev)
        log(f"  {loss_name:10s} seed {seed} epoch {epoch}: dev acc {100 * acc:.2f}  ({time.time() - t0:.0f} s)")
        if acc > best[0]:
            best = (acc, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return model, {"dev_acc": best[0], "best_epoch": best[1], "updates": updates, "seconds": time.time() - t0}


def sparse_stats(model, splits, vocabs, gamma):
    """Per test sentence: the number of tag sequences with non-zero probability (exact, structattn.count_sequences)
    and whether the gold sequence is one of them (structattn.sequence_probability > 0)."""
    model.eval()
    counts, gold_in = [], []
    with torch.no_grad():
        for sents in batches(splits["test"], 256):
            feats, tags, lengths = encode(sents, vocabs)
            theta = model(feats, lengths)
            counts += count_sequences(theta, lengths, gamma, reg="l2")
            gold_in += (sequence_probability(theta, tags, lengths, gamma, reg="l2") > 0).tolist()
    return counts, gold_in


def examples(model, splits, vocabs, gamma, k=3, max_len=14):
    """The first k short test sentences whose ℓ2 support has 2..6 sequences: words, gold tags, listed sequences."""
    model.eval()
    out = []
    names = vocabs["tag"]
    with torch.no_grad():
        for sent in splits["test"]:
            if len(sent) > max_len:
                continue
            feats, tags, lengths = encode([sent], vocabs)
            theta = model(feats, lengths)
            n = count_sequences(theta, lengths, gamma, reg="l2")[0]
            if not 2 <= n <= 6:
                continue
            seqs = sparse_decode(theta, lengths, gamma, max_sequences=6)[0]
            E = viterbi_marginals(theta, lengths, "l2", gamma)[0].sum(-1)  # (T, S): p(y_t = i)
            out.append({
                "words": [w for w, _ in sent], "gold": [t for _, t in sent],
                "sequences": [{"tags": [names[i] for i in s.tags], "p": s.probability} for s in seqs],
                "marginals": E.tolist(), "tagset": names,
            })
            if len(out) == k:
                break
    return out


def support_line(counts, gold_in=None) -> str:
    c = sorted(counts)
    le10 = sum(1 for x in c if x <= 10)
    line = (f"sequences with p > 0 per test sentence: ≤ 10 on {le10}/{len(c)} ({100 * le10 / len(c):.1f} %), "
            f"exactly 1 on {sum(1 for x in c if x == 1)}, median {statistics.median(c)}, 90th percentile "
            f"{c[int(0.9 * (len(c) - 1))]}, max {max(c)}")
    if gold_in is not None:
        k = sum(gold_in)
        line += f"; gold sequence among them on {k}/{len(gold_in)} ({100 * k / len(gold_in):.1f} %)"
    return line


def summarise(vals):
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f}"
    return f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f}"


def figure(example, entropy_marginals, path):
    """A picture like the paper's Figure 6: tag marginals per token for −H and ℓ2, gold tags as red dots, non-zero
    cells outlined (matplotlib is an optional dependency: the `plot` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tagset, words, gold = example["tagset"], example["words"], example["gold"]
    panels = [("$\\ell_2^2$", np.array(example["marginals"]))]
    if entropy_marginals is not None:
        panels.insert(0, ("negentropy", np.array(entropy_marginals)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.0 + 1.1 * len(words), 0.35 * len(tagset) + 1.6),
                             sharey=True)
    for ax, (title, M) in zip(np.atleast_1d(axes), panels):
        ax.imshow(M.T, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for t in range(M.shape[0]):
            for i in range(M.shape[1]):
                if M[t, i] > 0 and title != "negentropy":
                    ax.add_patch(plt.Rectangle((t - 0.5, i - 0.5), 1, 1, fill=False, ec="0.4", lw=1))
            ax.plot(t, tagset.index(gold[t]), "o", color="red", ms=4)
        ax.set_xticks(range(len(words)), words, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(tagset)), tagset, fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--decode-gammas", type=float, nargs="*", default=[],
                   help="also count the ℓ2 supports when decoding with these γ' (test time)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "work")
    p.add_argument("--figure", type=Path, default=None, help="write a Figure-6-like PNG here (needs matplotlib)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    splits = load_splits(locate_corpus())
    vocabs = build_vocabs(splits["train"])
    log(f"TWT: {', '.join(f'{k} {len(v)} sentences / {sum(map(len, v))} tokens' for k, v in splits.items())}; "
        f"{len(vocabs['tag'])} tags; structattn {structattn.__version__}, torch {torch.__version__}")
    test = [encode(b, vocabs) for b in batches(splits["test"], 256)]
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": [], "examples": []}
    entropy_model = None
    for seed in args.seeds:
        for name in args.losses:
            model, info = train_one(name, seed, splits, vocabs, args, log)
            info.update(loss=name, seed=seed, gamma=args.gamma, test_acc=accuracy(model, test))
            if name == "entropy" and entropy_model is None:
                entropy_model = model
            if name == "l2":
                info["support"], info["gold_in_support"] = sparse_stats(model, splits, vocabs, args.gamma)
                # decoding at a smaller γ' than the training γ = the distribution of θ·γ/γ' (sharper, sparser):
                # the paper's "trade precision for recall at test time" knob
                info["decode_gammas"] = {}
                for g in args.decode_gammas:
                    c, gi = sparse_stats(model, splits, vocabs, g)
                    info["decode_gammas"][str(g)] = {"support": c, "gold_in_support": gi}
                if not results["examples"]:
                    results["examples"] = examples(model, splits, vocabs, args.gamma)
                    if entropy_model is not None:
                        add_entropy_marginals(results["examples"], entropy_model, vocabs, args.gamma)
                    if args.figure and results["examples"]:
                        e = max(results["examples"], key=lambda e: len(e["sequences"]))
                        figure(e, e.get("entropy_marginals"), args.figure)
                        log(f"wrote {args.figure}")
            log(f"{name} seed {seed}: dev {100 * info['dev_acc']:.2f} (epoch {info['best_epoch']}), "
                f"test {100 * info['test_acc']:.2f}, {info['seconds']:.0f} s")
            results["runs"].append(info)
            # written after every run, so that an interrupted run keeps what it measured
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
            (args.out / "summary.md").write_text(summary(results, args.losses) + "\n")
    print(summary(results, args.losses))


def add_entropy_marginals(exs, model, vocabs, gamma):
    """The −H model's tag marginals on the same sentences, for the figure."""
    model.eval()
    for e in exs:
        feats, _, lengths = encode([list(zip(e["words"], e["gold"]))], vocabs)
        with torch.no_grad():
            E = viterbi_marginals(model(feats, lengths), lengths, "entropy", gamma)
        e["entropy_marginals"] = E[0].sum(-1).tolist()


def summary(results, losses) -> str:
    lines = ["| loss | seeds | dev acc (%) | test acc (%) | best epoch | s / run |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in losses:
        rs = [r for r in results["runs"] if r["loss"] == name]
        if not rs:
            continue
        lines.append(f"| {name} | {len(rs)} | {summarise([r['dev_acc'] for r in rs])} | "
                     f"{summarise([r['test_acc'] for r in rs])} | {', '.join(str(r['best_epoch']) for r in rs)} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    for r in results["runs"]:
        if "support" in r:
            lines.append(f"\nℓ2 seed {r['seed']} (γ = {r.get('gamma', '?')}): " + support_line(r["support"],
                                                                                      r.get("gold_in_support")))
            for g, d in r.get("decode_gammas", {}).items():
                lines.append(f"  decoded with γ' = {g}: " + support_line(d["support"], d["gold_in_support"]))
    for e in results["examples"]:
        lines.append("\n" + " ".join(e["words"]))
        lines.append("gold: " + " ".join(e["gold"]))
        for s in e["sequences"]:
            lines.append(f"  p = {s['p']:.4f}: " + " ".join(s["tags"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
