"""Health of a trained model's Viterbi attention: fallback (dead) rows on the dumped test hypotheses and the
learned transitions T/γ.

    structattn-health --checkpoint CKPT --data BIN --dump attention.jsonl \
        --annotate --json health.json
    structattn-health --toolkit onmt --checkpoint RUN/model_best.pt \
        --dump RUN/attention.jsonl --annotate --json health.json

Fallback rows. A Viterbi attention row falls back to softmax when p(y_t = 1) = 0 for every source position
(:func:`structattn.attention.dead_rows`); the dumped matrix (a dense softmax row) cannot show it. This tool
re-runs the model on each dumped hypothesis by forced decoding (teacher forcing on the hypothesis' own tokens,
which reproduces the decoder states of beam search) and records, per target row, whether it fell back. It checks
that the forced attention equals the dumped one (``max_abs_diff``), and with ``--annotate`` rewrites the dump with
``extra["fallback_rows"]`` per record, which ``structattn-stats`` shows as its "fallback rows" column.

Transitions. T (2×2, T[i, j]: state j at t−1 → state i at t) divided by γ, the scale on which it matters, and
its coupling κ = (T₀₀ + T₁₁ − T₀₁ − T₁₀)/γ (:func:`structattn.ops.segmentation.chain_coupling`). Any T of the
form f(i) + g(j) — whatever its size — makes the chain factorise into independent per-position gates: three of the
four directions of T only shift the scores, κ is the one that couples neighbours. A model with
|κ| < :data:`~structattn.ops.segmentation.INDEPENDENT_KAPPA` (0.25: for −H, attending to x_{t−1} changes the odds
of attending to x_t by less than 1.28×) is flagged as an *independent-positions* model; ``coupling`` says
"independent positions", "weakly contiguous"/"weakly alternating" (|κ| < 1) or "contiguous"/"alternating". (An
earlier version flagged only max |T/γ| < 0.05, which missed every model whose T had moved along the shift
directions.) A chain-off model (``--attention-chain off``) has κ = 0 by construction (``chain`` false). For
the stable form (prior τ = [[c, 0], [0, c]] at init, κ = 2c) the change from the initial value is reported too.

Aligned or parked (any attention, from ``--dump`` alone: the dump's final hypotheses). A model can ignore the
alignment by parking its attention on the source's ``</s>`` or on a fixed region of the source (a quickstart
softmax model put 70 % of its target words' argmax in the last fifth of the source with only 0.17 of its weight
on ``</s>``). ``parked`` is :func:`structattn.report.diagonality.parked_verdict`: "parked on </s>" when the EOS
mass exceeds :data:`~structattn.report.diagonality.EOS_MASS_PARKED` (0.5), else "parked on a source region" when
the mean top-fifth share (share of a sentence's target rows whose argmax lies in its most visited source fifth)
exceeds :data:`~structattn.report.diagonality.PARKED_SHARE` (0.5: between 0.32–0.35 for the quickstart models that
translate and 0.67 for the one that did not; docs/attention_maps.md), else "aligned"; the diagonality ρ
(Spearman's correlation of target position and argmax source position) is reported beside it, not used by the
verdict, because it also drops for language pairs that reorder.

Output JSON: {"attention", "reg", "gamma", "form", "chain", "T_over_gamma", "T_over_gamma_init", "kappa",
"coupling", "independent_positions", "T_over_gamma_moved", "rows", "fallback_rows", "fallback_fraction",
"max_abs_diff", "eos_mass", "diagonality", "top_fifth_share", "alignment_sentences", "parked",
"parked_thresholds"}; softmax/sparsemax models give "attention", the parked fields (with ``--dump``) and nulls.

OpenNMT-py models (``--toolkit onmt --checkpoint RUN/model_best.pt --dump RUN/attention.jsonl``, no ``--data``: the
vocabulary is in the checkpoint): the same report, with the model loaded as ``structattn-onmt-translate`` loads
it and the dumped hypotheses forced through OpenNMT-py's encoder-decoder (right-padded sources, the decoder start
token first). The recipes run it on the dumps of ``structattn-onmt-translate -dump_attention``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .. import __version__

def transitions_report(att) -> dict:
    """T/γ, its initial value, κ, its verdict and the independent-positions flag of a ViterbiAttention module."""
    from structattn.ops.segmentation import INDEPENDENT_KAPPA, chain_coupling, coupling_verdict

    t = att.effective_transitions().detach().double() / att.gamma
    tau = t.tolist()
    c = att.contiguity
    init = [[c, 0.0], [0.0, c]]
    moved = max(abs(tau[i][j] - init[i][j]) for i in range(2) for j in range(2))
    kappa = float(chain_coupling(t))
    return {
        "chain": bool(getattr(att, "chain", True)),
        "T_over_gamma": [[round(x, 4) for x in row] for row in tau],
        "T_over_gamma_init": init,
        "T_over_gamma_moved": round(moved, 4),
        "kappa": round(kappa, 4),
        "coupling": coupling_verdict(kappa),
        "independent_positions": bool(abs(kappa) < INDEPENDENT_KAPPA),
    }


def parking_report(records, eos: str) -> dict:
    """EOS mass, diagonality ρ, top-fifth share, counted sentences and the "parked" verdict of a dump's final
    hypotheses (``structattn-stats``' numbers; see the module docstring), with the thresholds used."""
    from structattn.report.diagonality import EOS_MASS_PARKED, PARKED_SHARE, parked_verdict
    from structattn.report.stats import dump_stats

    st = dump_stats(records, nbest_rank=0, eos=eos)
    out = {k: (None if st[k] != st[k] else st[k])
           for k in ("eos_mass", "diagonality", "top_fifth_share", "alignment_sentences")}
    out["parked"] = parked_verdict(out["eos_mass"], out["top_fifth_share"])
    out["parked_thresholds"] = {"eos_mass": EOS_MASS_PARKED, "top_fifth_share": PARKED_SHARE}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="structattn-health", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"structattn {__version__}")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--toolkit", choices=("fairseq", "onmt"), default="fairseq",
                   help="fairseq (default: a fairseq-train checkpoint, with --data) or onmt (a structattn-onmt-train "
                        "checkpoint, dumped by structattn-onmt-translate -dump_attention)")
    p.add_argument("--data", help="fairseq binary data folder (for the dictionaries; --toolkit fairseq)")
    p.add_argument("--dump", help="attention dump of fairseq-generate --dump-attention (omit: transitions only)")
    p.add_argument("--annotate", action="store_true", help="rewrite --dump with extra.fallback_rows per record")
    p.add_argument("--json", help="write the report here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    if args.annotate and not args.dump:
        p.error("--annotate needs --dump")
    if args.toolkit == "fairseq" and not args.data:
        p.error("--toolkit fairseq needs --data")

    import numpy as np
    import torch

    from structattn.attention import ViterbiAttention
    from structattn.export import eos_symbol, read_dump, write_dump

    model, att, forward = (_load_onmt if args.toolkit == "onmt" else _load_fairseq)(args)
    report = {"checkpoint": args.checkpoint, "attention": type(att).__name__}
    if args.dump:
        metadata, records = read_dump(args.dump, sort=False)
        report.update(parking_report(records, eos_symbol(metadata)))
    if not isinstance(att, ViterbiAttention):
        report.update(reg=None, gamma=None, form=None, T_over_gamma=None, kappa=None, coupling=None,
                      independent_positions=None,
                      rows=None, fallback_rows=None, fallback_fraction=None)
        _emit(report, args.json)
        return 0
    report.update(reg=att.reg, gamma=att.gamma, form=att.form, contiguity=att.contiguity)
    report.update(transitions_report(att))
    if args.dump:
        rows = dead_total = 0
        max_diff = 0.0
        att.pop_fallback_counts()
        with torch.no_grad():
            for start in range(0, len(records), args.batch_size):
                batch = records[start:start + args.batch_size]
                att.recorded_dead = []
                try:
                    attns = forward(batch)  # per record: (len(tgt_tokens), len(src_tokens)) forced attention
                    flags = torch.stack(att.recorded_dead, 1)  # (bsz, T)
                finally:
                    att.recorded_dead = None
                att.pop_fallback_counts()
                for i, r in enumerate(batch):
                    n = len(r.tgt_tokens)
                    a = attns[i]
                    max_diff = max(max_diff, float(np.abs(a - np.asarray(r.attention, dtype=np.float32)).max()))
                    fb = [int(k) for k in torch.nonzero(flags[i, :n]).flatten().tolist()]
                    r.extra["fallback_rows"] = fb
                    rows += n
                    dead_total += len(fb)
        report.update(rows=rows, fallback_rows=dead_total, fallback_fraction=dead_total / rows if rows else None,
                      max_abs_diff=max_diff)
        if args.annotate:
            summary = dict(metadata.get("summary") or {})
            summary["fallback_rows"] = dead_total
            meta = {k: v for k, v in metadata.items() if k != "summary"}
            meta["fallback_annotation"] = ("extra.fallback_rows: rows that fell back to softmax, from a forced "
                                           "decoding by structattn-health")
            records.sort(key=lambda r: (r.id, r.nbest_rank))
            write_dump(args.dump, meta, records, summary)
    _emit(report, args.json)
    return 0


def _load_fairseq(args):
    """(model, its attention module, forward(records) → forced attention per record) of a fairseq checkpoint."""
    import torch
    from fairseq import checkpoint_utils
    from fairseq import utils as fairseq_utils

    from ..userdir import plugin_dir

    fairseq_utils.import_user_module(argparse.Namespace(user_dir=plugin_dir()))
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.checkpoint],
                                                                     arg_overrides={"data": args.data})
    model = models[0].eval()
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    pad, eos = tgt_dict.pad(), tgt_dict.eos()

    def forward(batch):
        src = [torch.tensor([src_dict.index(t) for t in r.src_tokens]) for r in batch]
        tgt = [torch.tensor([tgt_dict.index(t) for t in r.tgt_tokens]) for r in batch]
        S, T = max(len(x) for x in src), max(len(x) for x in tgt)
        src_tokens = torch.full((len(batch), S), pad, dtype=torch.long)
        prev = torch.full((len(batch), T), pad, dtype=torch.long)
        for i, (s_ids, t_ids) in enumerate(zip(src, tgt)):
            src_tokens[i, S - len(s_ids):] = s_ids  # left padding, as fairseq's translation task
            prev[i, 0] = eos
            prev[i, 1:len(t_ids)] = t_ids[:-1]
        lengths = src_tokens.ne(pad).sum(1)
        _, attn = model(src_tokens, lengths, prev)
        if isinstance(attn, dict):  # fairseq decoders differ: a tensor, or {"attn": [tensor]}
            attn = attn["attn"][0] if isinstance(attn["attn"], (list, tuple)) else attn["attn"]
        # (bsz, T, S), columns in the source's (left-padded) layout
        return [attn[i, :len(tgt[i]), S - len(src[i]):].float().numpy() for i in range(len(batch))]

    return model, model.decoder.attention.attention, forward


def _load_onmt(args):
    """(model, its attention module, forward(records) → forced attention per record) of a structattn-onmt-train
    checkpoint, loaded as structattn-onmt-translate loads it. OpenNMT-py pads sources on the right and starts the
    target with its decoder start token; the dump's target tokens end with </s> when the search ended there."""
    import torch

    from structattn_onmt import patches

    patches.quiet_onmt_warnings()
    patches.install()
    import onmt.model_builder
    from onmt.bin.translate import _get_parser
    from onmt.constants import DefaultTokens

    opt = _get_parser().parse_args(["-model", args.checkpoint, "-src", os.devnull])
    vocabs, model, _ = onmt.model_builder.load_test_model(opt)
    model.eval()
    layer = model.decoder.attn
    att = getattr(layer, "attention", None)  # the library's module (structattn_onmt.layer, `general` score)
    if att is None:
        raise SystemExit(f"{args.checkpoint}: not a structattn-onmt-train model with the general score")
    src_vocab, tgt_vocab = vocabs["src"], vocabs["tgt"]
    start = vocabs.get("decoder_start_token", DefaultTokens.BOS)
    src_pad = src_vocab.lookup_token(DefaultTokens.PAD)
    tgt_pad = tgt_vocab.lookup_token(DefaultTokens.PAD)

    def forward(batch):
        src = [src_vocab(list(r.src_tokens)) for r in batch]
        tgt = [tgt_vocab([start] + list(r.tgt_tokens)) for r in batch]  # model() drops the last one (dec_in)
        S, T = max(len(x) for x in src), max(len(x) for x in tgt)
        src_t = torch.full((len(batch), S, 1), src_pad, dtype=torch.long)
        tgt_t = torch.full((len(batch), T, 1), tgt_pad, dtype=torch.long)
        for i, (s_ids, t_ids) in enumerate(zip(src, tgt)):
            src_t[i, :len(s_ids), 0] = torch.tensor(s_ids)
            tgt_t[i, :len(t_ids), 0] = torch.tensor(t_ids)
        src_len = torch.tensor([len(x) for x in src])
        _, attns = model(src_t, tgt_t, src_len)
        attn = attns["std"]  # (bsz, T - 1, S): batch-major (structattn_onmt.patches: attention layout)
        return [attn[i, :len(tgt[i]) - 1, :len(src[i])].float().numpy() for i in range(len(batch))]

    return model, att, forward


def _emit(report, path):
    text = json.dumps(report, indent=1, sort_keys=True)
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
