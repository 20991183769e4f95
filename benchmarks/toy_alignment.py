"""How early each attention finds the alignment: the reversal toy through the real fairseq CLIs.

Data (deterministic, ``--data-seed``): random sentences of 5–15 words over a 30-word vocabulary, target = the
reversed source; 2,000 train / 200 valid / 200 test. Model: ``--arch structattn_lstm`` at the plugin defaults
(64-dim embeddings, 1-layer bidirectional 2×64 encoder, 1-layer 64 decoder, dropout 0.1), Adam 1e-2, batch 32,
clip-norm 1, the same ``--max-update`` for every attention (default 504 = 8 epochs of 63 batches), validation
after every epoch. The Viterbi attentions run at γ = 1 (``--gamma``; ``--gamma 0``: the plugin's default γ, 2 for
−H and 10 for ℓ2), in the plugin's default form.

Per run it reports: the validation loss (bits/token) per epoch, the first epoch whose loss is below
``--threshold`` (1.0 bit: a source-blind model cannot go below the target's unigram entropy, ≈ 4.9 bits), test
BLEU (sacrebleu on fairseq-generate's hypotheses, beam 5) and, from a teacher-forced pass over the test set with
the final model (eval mode), the attention's support per row (mean number of non-zero weights over the real
source positions), the fraction of rows with support 1 and the *alignment accuracy* (fraction of target words whose
attention argmax is the mirrored source position).

While training, a hook on the attention module records per update (first decoder call of the batch, every row):
the spread max − min of the scores over the real positions, the sparsemax support |{t: sparsemax(s)_t > 0}| of
those scores (whatever the attention in use: what sparsemax *would* do), the fraction of rows with support 1,
and the gradient reaching the scores: the fraction of score entries with exactly zero gradient. The first
``--trace`` updates and then every 25th are written to the run's JSON.

Candidate fixes are applied in the training child only, without touching the library (``--init-scale E``:
M ~ U(−E, E) instead of the module's initialisation, ``--temperature τ``: the normaliser sees s/τ), so the same
script measures the library before and after a change.

    python benchmarks/toy_alignment.py --out /tmp/toy --attentions softmax sparsemax --seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
USER_DIR = ROOT / "user_dir"

ATTENTIONS = {
    "softmax": ["--attention", "softmax"],
    "sparsemax": ["--attention", "sparsemax"],
    "viterbi-entropy": ["--attention", "viterbi", "--attention-reg", "entropy"],
    "viterbi-l2": ["--attention", "viterbi", "--attention-reg", "l2"],
}


def make_data(raw: Path, seed: int = 0, vocab: int = 30, lengths=(5, 15), sizes=(2000, 200, 200)) -> float:
    """Write {train,valid,test}.{src,tgt} (target = reversed source); return the target unigram entropy (bits)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    raw.mkdir(parents=True, exist_ok=True)
    counts = Counter()
    for split, n in zip(("train", "valid", "test"), sizes):
        src = [[rng.choice(words) for _ in range(rng.randint(*lengths))] for _ in range(n)]
        (raw / f"{split}.src").write_text("".join(" ".join(s) + "\n" for s in src))
        (raw / f"{split}.tgt").write_text("".join(" ".join(s[::-1]) + "\n" for s in src))
        if split == "train":
            for s in src:
                counts.update(s + ["</s>"])
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], env=_env(), capture_output=True, text=True, cwd=ROOT, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def preprocess(raw: Path, dest: Path) -> None:
    if (dest / "dict.src.txt").exists():
        return
    _run([sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt",
          "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
          "--destdir", dest, "--joined-dictionary", "--workers", "1"])


# ---- the training child: fairseq-train with the optional patches and the score hook ---------------------------------


def _child(argv) -> None:
    """``python toy_alignment.py --child TRACE_JSON INIT_SCALE TEMPERATURE TRACE_N -- <fairseq-train args>``."""
    trace_path, init_scale, temperature, trace_n = argv[0], float(argv[1]), float(argv[2]), int(argv[3])
    import torch
    from fairseq import trainer as fs_trainer
    from fairseq_cli import train as fs_train

    from structattn import attention as A

    if init_scale >= 0:  # candidate fix (a), applied to this attention's M after the module's own initialisation
        def reinit(module):
            if init_scale == 0:
                torch.nn.init.zeros_(module.proj.weight)
            else:
                torch.nn.init.uniform_(module.proj.weight, -init_scale, init_scale)

        for cls in (A.SoftmaxAttention, A.SparsemaxAttention, A.ViterbiAttention):
            orig = cls.__init__

            def wrapped(self, *a, _orig=orig, **k):
                _orig(self, *a, **k)
                reinit(self)

            cls.__init__ = wrapped
    state = {"update": 0, "seen": -1, "rows": []}
    forward = A._BilinearAttention.forward

    def hooked(self, query, keys, padding_mask=None):
        scores = A.bilinear_scores(query, keys, self.proj)
        if temperature != 1.0:  # candidate fix (b)
            scores = scores / temperature
        w = self.normalize(scores, padding_mask)
        context = torch.bmm(w.unsqueeze(1).to(keys.dtype), keys).squeeze(1)
        u = state["update"]
        if self.training and state["seen"] != u and (u < trace_n or u % 25 == 0):
            state["seen"] = u  # first decoder step of this update's batch: every row has all its positions
            with torch.no_grad():
                real = torch.ones_like(scores, dtype=torch.bool) if padding_mask is None else ~padding_mask
                s = scores.detach().float()
                hi = s.masked_fill(~real, -math.inf).amax(-1)
                lo = s.masked_fill(~real, math.inf).amin(-1)
                sp = A.sparsemax_attention(s, None if padding_mask is None else padding_mask)
                supp = ((sp > 0) & real).sum(-1).float()
                rec = {"update": u, "spread": float((hi - lo).mean()), "sparsemax_support": float(supp.mean()),
                       "support1": float((supp == 1).float().mean()), "len": float(real.sum(-1).float().mean()),
                       "m_absmax": float(self.proj.weight.abs().max())}
            if scores.requires_grad:
                def grad_hook(g, rec=rec, real=real):
                    rec["zero_grad_frac"] = float(((g == 0) & real).sum() / real.sum())
                scores.register_hook(grad_hook)
            state["rows"].append(rec)
        return context, w

    A._BilinearAttention.forward = hooked
    step = fs_trainer.Trainer.train_step

    def counted(self, *a, **k):
        out = step(self, *a, **k)
        state["update"] += 1
        return out

    fs_trainer.Trainer.train_step = counted
    sys.argv = ["fairseq-train", *argv[5:]]
    try:
        fs_train.cli_main()
    finally:
        Path(trace_path).write_text(json.dumps(state["rows"]))


# ---- the parent: train, generate, analyse -------------------------------------------------------------------------


# fairseq's format ("| valid | {…}") or, when logging was configured before fairseq_cli.train set its own, the
# default one ("INFO:valid:{…}")
_JSON = re.compile(r"(?:\|\s*|INFO:)(valid|train)(?:\s*\||:)\s*(\{.*\})\s*$")


def _analyse(bin_dir: Path, checkpoint: Path) -> dict:
    """Teacher-forced pass over the test set in eval mode: support per row, support-1 rows, alignment accuracy."""
    import torch
    from argparse import Namespace

    from fairseq import checkpoint_utils, utils

    utils.import_user_module(Namespace(user_dir=str(USER_DIR)))
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)],
                                                                       arg_overrides={"data": str(bin_dir)})
    model = models[0].eval()
    task.load_dataset("test")
    ds = task.dataset("test")
    supp, one, hit, n = 0.0, 0, 0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            s = ds[i]
            src, tgt = s["source"].unsqueeze(0), s["target"].unsqueeze(0)
            prev = torch.cat([tgt.new_tensor([[task.tgt_dict.eos()]]), tgt[:, :-1]], 1)
            _, attn = model(src, torch.tensor([src.size(1)]), prev)  # the LSTM decoder returns (x, attn)
            attn = attn[0]  # (tgt_len, src_len), target and source EOS included
            L = src.size(1) - 1  # source words (EOS last)
            nz = (attn > 0).sum(-1).float()
            supp += float(nz.sum())
            one += int((nz == 1).sum())
            n += attn.size(0)
            # target word j (0-based, j < L) is source word L-1-j
            arg = attn[:L].argmax(-1)
            hit += int((arg == torch.arange(L - 1, -1, -1)).sum())
    words = sum(ds[i]["source"].numel() - 1 for i in range(len(ds)))
    return {"support": supp / n, "support1_frac": one / n, "align_acc": hit / words}


def run_one(name: str, seed: int, bin_dir: Path, out: Path, args) -> dict:
    save = out / f"ck-{name}-s{seed}-i{args.init_scale:g}-t{args.temperature:g}"
    trace = save.with_suffix(".trace.json")
    extra = ["--attention-gamma", str(args.gamma)] if name.startswith("viterbi") and args.gamma > 0 else []
    train = [bin_dir, "--user-dir", USER_DIR, "--arch", "structattn_lstm", *ATTENTIONS[name], *extra,
             "--optimizer", "adam", "--lr", str(args.lr), "--clip-norm", "1.0", "--batch-size", "32",
             "--max-update", str(args.max_update), "--save-dir", save, "--seed", str(seed), "--cpu",
             "--num-workers", "0", "--no-progress-bar", "--log-format", "json", "--log-interval", "100",
             "--no-epoch-checkpoints", "--no-last-checkpoints", "--criterion", "cross_entropy",
             "--required-batch-size-multiple", "1"]
    t0 = time.time()
    proc = _run([sys.executable, __file__, "--child", trace, args.init_scale, args.temperature, args.trace, "--",
                 *train])
    secs = time.time() - t0
    valid = [float(json.loads(m.group(2))["valid_loss"]) for m in map(_JSON.search, proc.stdout.splitlines())
             if m and m.group(1) == "valid"]
    if not valid:  # fairseq's logging went to stderr
        valid = [float(json.loads(m.group(2))["valid_loss"]) for m in map(_JSON.search, proc.stderr.splitlines())
                 if m and m.group(1) == "valid"]
    below = next((i + 1 for i, v in enumerate(valid) if v < args.threshold), None)
    gen = _run([sys.executable, "-m", "fairseq_cli.generate", bin_dir, "--user-dir", USER_DIR, "--path",
                save / "checkpoint_best.pt", "--gen-subset", "test", "--beam", "5", "--batch-size", "50", "--cpu"])
    hyps, refs = {}, {}
    for line in gen.stdout.splitlines():
        for tag, d in (("H-", hyps), ("T-", refs)):
            if line.startswith(tag):
                parts = line.split("\t")
                d[int(parts[0][2:])] = parts[-1]
    import sacrebleu

    ids = sorted(refs)
    bleu = sacrebleu.corpus_bleu([hyps.get(i, "") for i in ids], [[refs[i] for i in ids]]).score
    res = {"attention": name, "seed": seed, "init_scale": args.init_scale, "temperature": args.temperature,
           "valid_loss": valid, "epoch_below": below, "bleu": round(bleu, 1), "train_s": round(secs),
           **_analyse(bin_dir, save / "checkpoint_best.pt"), "trace": json.loads(trace.read_text())}
    for p in save.glob("*.pt"):
        p.unlink()
    return res


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=list(ATTENTIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--max-update", type=int, default=504)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--gamma", type=float, default=1.0, help="γ of the Viterbi attentions (≤ 0: the plugin default)")
    p.add_argument("--threshold", type=float, default=1.0, help="validation loss (bits/token) that counts as found")
    p.add_argument("--init-scale", type=float, default=-1.0,
                   help="candidate fix: M ~ U(-E, E) (0: M = 0); negative: the library's initialisation")
    p.add_argument("--temperature", type=float, default=1.0, help="candidate fix: normalise s / τ")
    p.add_argument("--trace", type=int, default=40, help="trace every one of the first N updates (then every 25th)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    entropy = make_data(args.out / "raw", args.data_seed)
    preprocess(args.out / "raw", args.out / "bin")
    print(f"target unigram entropy {entropy:.2f} bits; threshold {args.threshold} bits; "
          f"init_scale {args.init_scale:g}, temperature {args.temperature:g}", flush=True)
    results = []
    for name in args.attentions:
        for seed in args.seeds:
            r = run_one(name, seed, args.out / "bin", args.out, args)
            results.append(r)
            t = r["trace"]
            early = next((x for x in t if x["update"] >= 20), t[-1])
            print(f"{name:16s} seed {seed}  BLEU {r['bleu']:5.1f}  epoch<thr {r['epoch_below']}  "
                  f"support {r['support']:.2f} (1: {r['support1_frac']:.0%})  align {r['align_acc']:.0%}  "
                  f"valid {' '.join(f'{v:.2f}' for v in r['valid_loss'])}  "
                  f"init spread {t[0]['spread']:.3f} supp {t[0]['sparsemax_support']:.1f}/{t[0]['len']:.1f}  "
                  f"u{early['update']}: spread {early['spread']:.2f} supp {early['sparsemax_support']:.2f} "
                  f"supp1 {early['support1']:.0%} zero-grad {early.get('zero_grad_frac', float('nan')):.0%}  "
                  f"({r['train_s']} s)", flush=True)
            with open(args.out / "results.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
