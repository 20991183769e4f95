"""Per-head scale of a ``structattn_transformer``'s cross-attention scores s = q·k/√d, against its γ.

For a checkpoint (or, with ``--init``, a fresh model of the same configuration and seed), a teacher-forced pass over
the first ``--batches`` validation batches (2,000 tokens each) records, for every decoder layer and head, the
standard deviation of each row's scores over its real source positions (median and 90th percentile over rows), the
range max − min of a row (median), and the fraction of exact zeros of the weights on real positions. What it is for:
ℓ2 rows reach exact zeros only where the scores' spread is comparable with γ (docs/transformer.md, "The heads'
temperature"). Usage, from the repository root with the plugin importable:

    python benchmarks/head_score_scale.py CHECKPOINT [--init] [--batches 6] [--data DATA-BIN]
"""
import argparse

import torch
from fairseq import checkpoint_utils, tasks

import structattn_fairseq  # noqa: F401  (registers the models)

ap = argparse.ArgumentParser()
ap.add_argument("ckpt"); ap.add_argument("--init", action="store_true"); ap.add_argument("--batches", type=int, default=6)
ap.add_argument("--data", help="binarised data (default: the checkpoint's)")
a = ap.parse_args()
state = checkpoint_utils.load_checkpoint_to_cpu(a.ckpt)
cfg = state["cfg"]
if a.data:
    cfg.task.data = a.data
task = tasks.setup_task(cfg.task)
torch.manual_seed(cfg.common.seed)
model = task.build_model(cfg.model)
if not a.init:
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
model.eval()
stats = {}
for li, layer in enumerate(model.decoder.layers):
    att = layer.encoder_attn
    orig = att.normalize
    def norm(scores, mask, li=li, orig=orig, att=att):
        w = orig(scores, mask)
        real = ~mask
        n = real.sum(-1).clamp_min(1)
        s = scores.masked_fill(mask, 0.0)
        mean = s.sum(-1, keepdim=True) / n[..., None]
        c = (s - mean).masked_fill(mask, 0.0)
        std = (c.pow(2).sum(-1) / n).sqrt()                       # (B, H, Q)
        rng = scores.masked_fill(mask, -1e30).amax(-1) - scores.masked_fill(mask, 1e30).amin(-1)
        zeros = ((w == 0) & real).sum((0, 2, 3)).double() / real.sum((0, 2, 3))
        d = stats.setdefault(li, {"std": [], "range": [], "zeros": [], "cells": 0})
        d["std"].append(std.transpose(0, 1).reshape(std.shape[1], -1)); d["range"].append(rng.transpose(0, 1).reshape(rng.shape[1], -1))
        d["zeros"].append(zeros * real.sum((0, 2, 3)).double()); d["cells"] += real.sum((0, 2, 3)).double()
        return w
    att.normalize = norm
task.load_dataset("valid")
itr = task.get_batch_iterator(task.dataset("valid"), max_tokens=2000, max_positions=(256, 256),
                              ignore_invalid_inputs=True, seed=1).next_epoch_itr(shuffle=False)
with torch.no_grad():
    for i, sample in enumerate(itr):
        if i >= a.batches: break
        model(**sample["net_input"])
for li, d in stats.items():
    std = torch.cat(d["std"], 1); rng = torch.cat(d["range"], 1)
    z = sum(d["zeros"]) / d["cells"]
    norm_mod = model.decoder.layers[li].encoder_attn.normalizer
    g = norm_mod.matrix_gammas().detach().tolist() if norm_mod is not None else None
    for h in range(std.shape[0]):
        gh = "n/a" if g is None else f"{g[h if len(g) > 1 else 0]:.3g}"
        print(f"L{li}H{h} gamma={gh} row-std(s) median={std[h].median():.3f} "
              f"p90={std[h].quantile(0.9):.3f} row-range median={rng[h].median():.3f} zeros={100*z[h]:.1f}%")
