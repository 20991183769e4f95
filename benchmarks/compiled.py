#!/usr/bin/env python
"""Eager vs torch.compile: the same attention step and decoder step, timed both ways.

    python benchmarks/compiled.py                 # all parts, writes its section of benchmarks/RESULTS.md
    python benchmarks/compiled.py --no-decoder    # without the fairseq decoder step
    python benchmarks/compiled.py --output -      # print the section only

Parts (CPU, ``torch.set_num_threads(--threads)``, default 1):

* **attention step** — the step of benchmarks/run.py (bilinear scores, weights, context, gradient of a scalar loss
  of the context w.r.t. x, z, M and T; hidden 500, B=64, T=50): eager, and the forward + loss compiled with
  ``torch.compile(fullgraph=True)`` (Inductor) with the backward run by the compiled graph's autograd;
* **normaliser** — scores (B, T) → weights with left padding, forward + backward, as in benchmarks/normalizer.py;
* **decoder step** — one incremental step of the fairseq ``structattn_lstm`` decoder (embedding, input feeding,
  LSTM cell, attention, output projection; beam-search style, eval mode) on a batch of 64 sentences of ≤ 50 tokens.

Each compiled function is warmed up (compilation excluded from the timings) and checked against eager before
timing. Eager and compiled runs are interleaved, medians reported, ratios to eager softmax from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from run import GAMMA, machine_info  # noqa: E402  (benchmarks/run.py)

from structattn.attention import (  # noqa: E402
    build_attention,
    softmax_attention,
    sparsemax_attention,
    viterbi_attention,
)

MARK_BEGIN = "<!-- compiled.py: begin -->"
MARK_END = "<!-- compiled.py: end -->"


def _time(fns: dict, reps: int) -> dict:
    """Median seconds per call of each function, interleaved repetitions."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _check_same(a, b, what, tol):
    # Relative to each tensor's scale: float32, and Inductor reassociates sums.
    for x, y in zip(a, b):
        err = ((x - y).abs().max() / y.abs().max().clamp_min(1.0)).item()
        if err > tol:
            raise RuntimeError(f"{what}: compiled differs from eager by {err:.3g} (relative)")


def _pair(name, fwd, inputs, reps_warm=3):
    """(eager run, compiled run) of forward + backward of ``fwd(*inputs) -> scalar``; compiled warmed up and checked."""
    compiled = torch.compile(fwd, fullgraph=True)

    def run(f):
        return lambda: torch.autograd.grad(f(*inputs), inputs)

    t0 = time.perf_counter()
    for _ in range(reps_warm):
        got = run(compiled)()
    compile_s = time.perf_counter() - t0
    _check_same(got, run(fwd)(), name, 1e-4)
    return run(fwd), run(compiled), compile_s


def attention_step(B, T, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, T, H, generator=g) * 2 - 1).requires_grad_(True)
    z = (torch.rand(B, H, generator=g) * 2 - 1).requires_grad_(True)
    r = torch.randn(B, H, generator=g)
    mods = {"softmax": build_attention("softmax", H, H)}
    for reg, label in (("entropy", "-H"), ("l2", "l2")):
        m = build_attention("viterbi", H, H, reg, GAMMA[reg], "paper")  # raw T, set below
        with torch.no_grad():
            m.transitions.copy_(torch.tensor([[0.5, -0.5], [-0.5, 0.5]]))
        mods[f"viterbi {label}"] = m
    fns, compile_s = {}, {}
    for name, m in mods.items():
        params = [x, z] + list(m.parameters())

        def fwd(x, z, *params, m=m):
            context, _ = m(z, x)
            return (context * r).sum()

        eager, comp, cs = _pair(f"attention step {name}", fwd, params)
        fns[f"{name} eager"], fns[f"{name} compiled"], compile_s[name] = eager, comp, cs
    return fns, compile_s


def normaliser(B, T, seed=0):
    torch.manual_seed(seed)
    s = torch.randn(B, T, requires_grad=True)
    tr = torch.zeros(2, 2, requires_grad=True)
    pm = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        pm[b, : b % min(20, T)] = True
    cases = {
        "softmax": (lambda s: softmax_attention(s, pm).pow(2).sum(), [s]),
        "sparsemax": (lambda s: sparsemax_attention(s, pm).pow(2).sum(), [s]),
        "viterbi -H": (lambda s, tr: viterbi_attention(s, tr, pm, "entropy", GAMMA["entropy"]).pow(2).sum(), [s, tr]),
        "viterbi l2": (lambda s, tr: viterbi_attention(s, tr, pm, "l2", GAMMA["l2"]).pow(2).sum(), [s, tr]),
    }
    fns, compile_s = {}, {}
    for name, (f, inputs) in cases.items():
        eager, comp, cs = _pair(f"normaliser {name}", f, inputs)
        fns[f"{name} eager"], fns[f"{name} compiled"], compile_s[name] = eager, comp, cs
    return fns, compile_s


def decoder_step(B, T, hidden, seed=0):
    """One incremental decoder step (after 3 cached steps) of structattn_lstm, eval mode, no grad."""
    import argparse as ap
    from types import SimpleNamespace

    from fairseq.data import Dictionary

    from structattn_fairseq.structattn_lstm import StructAttnLSTMModel, structattn_lstm

    d = Dictionary()
    for i in range(1000):
        d.add_symbol(f"w{i}")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    src = torch.full((B, T), d.pad())
    for b, L in enumerate(lengths.tolist()):
        src[b, T - L:] = torch.randint(d.nspecial, len(d), (L,), generator=g)  # left-padded, as fairseq
    prev = torch.randint(d.nspecial, len(d), (B, 4), generator=g)
    fns, compile_s = {}, {}
    for name, kw in (("softmax", dict(attention="softmax")),
                     ("viterbi -H", dict(attention="viterbi", attention_reg="entropy")),
                     ("viterbi l2", dict(attention="viterbi", attention_reg="l2"))):
        args = ap.Namespace(arch="structattn_lstm", criterion="cross_entropy", dropout=0.0,
                            encoder_embed_dim=hidden, encoder_hidden_size=hidden, decoder_embed_dim=hidden,
                            decoder_hidden_size=hidden, decoder_out_embed_dim=hidden, **kw)
        structattn_lstm(args)
        torch.manual_seed(seed)
        model = StructAttnLSTMModel.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d))
        model.eval()
        with torch.no_grad():
            enc = model.encoder(src, lengths)
            state = {}
            for t in range(3):
                model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)
        snapshot = {k: dict(v) for k, v in state.items()}

        def step(f, model=model, enc=enc, snapshot=snapshot):
            st = {k: dict(v) for k, v in snapshot.items()}  # same cached state every call
            with torch.no_grad():
                return f(prev, encoder_out=enc, incremental_state=st)[0]

        compiled = torch.compile(model.decoder, fullgraph=True)
        t0 = time.perf_counter()
        for _ in range(3):
            got = step(compiled)
        compile_s[name] = time.perf_counter() - t0
        _check_same([got], [step(model.decoder)], f"decoder step {name}", 1e-4)
        fns[f"{name} eager"] = lambda step=step, model=model: step(model.decoder)
        fns[f"{name} compiled"] = lambda step=step, compiled=compiled: step(compiled)
        model.decoder.attention.attention.pop_fallback_counts() if name != "softmax" else None
    return fns, compile_s


def table(med: dict, compile_s: dict) -> list[str]:
    base = med["softmax eager"]
    lines = ["| method | eager | compiled | compiled / eager | eager / softmax eager | compiled / softmax eager |"
             " compile time |", "|---|---|---|---|---|---|---|"]
    for name in compile_s:
        e, c = med[f"{name} eager"], med[f"{name} compiled"]
        lines.append(f"| {name} | {e * 1e3:.3f} ms | {c * 1e3:.3f} ms | {c / e:.2f}× | {e / base:.2f}× | "
                     f"{c / base:.2f}× | {compile_s[name]:.0f} s |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions (attention and decoder steps)")
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=500, help="attention step hidden size")
    ap.add_argument("--decoder-hidden", type=int, default=256)
    ap.add_argument("--no-decoder", action="store_true", help="skip the fairseq decoder step")
    ap.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"),
                    help="RESULTS.md whose compiled.py section is replaced (appended if absent); - for stdout")
    args = ap.parse_args(argv)
    logging.getLogger("filelock").setLevel(logging.WARNING)  # fairseq's import turns on DEBUG for every logger
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    parts = []
    fns, cs = attention_step(args.B, args.T, args.hidden)
    parts.append((f"Attention step (forward + backward, hidden {args.hidden}, B={args.B}, T={args.T}, "
                  f"median of {args.reps})", _time(fns, args.reps), cs))
    fns, cs = normaliser(args.B, args.T)
    reps_n = args.reps * 10
    parts.append((f"Normaliser alone (scores → weights, left-padded, forward + backward, B={args.B}, T={args.T}, "
                  f"median of {reps_n})", _time(fns, reps_n), cs))
    if not args.no_decoder:
        fns, cs = decoder_step(args.B, args.T, args.decoder_hidden)
        parts.append((f"structattn_lstm incremental decoder step (eval, no grad, hidden {args.decoder_hidden}, "
                      f"B={args.B}, source ≤ {args.T}, vocabulary 1004, median of {args.reps})",
                      _time(fns, args.reps), cs))
    cmd = "python benchmarks/compiled.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [MARK_BEGIN, "## torch.compile vs eager (`benchmarks/compiled.py`)", "",
           f"Generated by `{cmd}` on {now}; {info['cpu']}, {info['cores']} cores visible, torch {info['torch']}, "
           f"`torch.set_num_threads({info['threads']})`, CUDA: {info['cuda']}. Compiled = `torch.compile(fn, "
           "fullgraph=True)` (Inductor, C++ on CPU); timings exclude compilation (last column: first three calls, "
           "shorter when Inductor's on-disk cache already holds the kernels).",
           ""]
    for title, med, cs in parts:
        out += [f"### {title}", ""] + table(med, cs) + [""]
    out.append(MARK_END)
    text = "\n".join(out)
    print(text)
    if args.output != "-":
        old = open(args.output).read() if os.path.exists(args.output) else ""
        if MARK_BEGIN in old and MARK_END in old:
            new = old[: old.index(MARK_BEGIN)] + text + old[old.index(MARK_END) + len(MARK_END):]
        else:
            new = old.rstrip("\n") + "\n\n" + text + "\n"
        with open(args.output, "w") as f:
            f.write(new)
        print(f"\nwrote {os.path.relpath(args.output, ROOT)}")


if __name__ == "__main__":
    main()
