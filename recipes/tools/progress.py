"""Condense ``fairseq-train --log-format json`` output (stdin) into one progress line per log interval (stderr).

The full log is kept by ``tee`` before this filter; here we only show update n/N, loss, speed and an ETA, and
pass through warnings and errors so that a failing run says why. ``structattn-onmt-train`` output (OpenNMT-py's
``Step N/M; acc: …; ppl: …; … tok/s; T sec;`` and ``Validation perplexity: X`` lines) is condensed the same way.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

_JSON = re.compile(r"(\{.*\})\s*$")
_ONMT_STEP = re.compile(r"\bStep\s+(\d+)/\s*\d+; acc:\s*(\S+); ppl:\s*(\S+);.*?(\d+)/\s*(\d+) tok/s;")
_ONMT_VALID = re.compile(r"Validation perplexity:\s*(\S+)")


def format_onmt_line(line: str, max_update: int, name: str, t0: float, first_update: int | None) -> str | None:
    """One progress line for OpenNMT-py's training report or validation line, else None."""
    m = _ONMT_STEP.search(line)
    if m:
        upd = int(m.group(1))
        msg = f"{name}: update {upd}" + (f"/{max_update}" if max_update else "")
        msg += f" ppl {m.group(3).rstrip(';')} acc {m.group(2).rstrip(';')} tgt tok/s {m.group(5)}"
        if max_update and first_update is not None and upd > first_update:
            rate = (upd - first_update) / max(time.time() - t0, 1e-6)
            msg += f" eta {max(max_update - upd, 0) / rate / 60:.1f} min"
        return msg
    m = _ONMT_VALID.search(line)
    return f"{name}: validation perplexity {m.group(1)}" if m else None


def format_line(rec: dict, max_update: int, name: str, t0: float, first_update: int | None) -> str | None:
    if "num_updates" not in rec and "train_num_updates" not in rec and "valid_loss" not in rec:
        return None
    if "valid_loss" in rec:
        return f"{name}: validation after epoch {rec.get('epoch')} loss {rec['valid_loss']} " \
               f"best {rec.get('valid_best_loss', '?')}"
    upd = int(float(rec.get("num_updates", rec.get("train_num_updates", 0))))
    loss = rec.get("loss", rec.get("train_loss", "?"))
    wps = rec.get("wps", rec.get("train_wps", "?"))
    msg = f"{name}: epoch {rec.get('epoch')} update {upd}" + (f"/{max_update}" if max_update else "")
    msg += f" loss {loss} wps {wps}"
    if max_update and first_update is not None and upd > first_update:
        rate = (upd - first_update) / max(time.time() - t0, 1e-6)
        msg += f" eta {max(max_update - upd, 0) / rate / 60:.1f} min"
    return msg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-update", type=int, default=0)
    p.add_argument("--name", default="train")
    args = p.parse_args(argv)
    t0, first = time.time(), None
    for line in sys.stdin:
        m = _JSON.search(line)
        if m:
            try:
                rec = json.loads(m.group(1))
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict):
                if first is None and "num_updates" in rec:
                    first, t0 = int(float(rec["num_updates"])), time.time()
                msg = format_line(rec, args.max_update, args.name, t0, first)
                if msg:
                    print(msg, file=sys.stderr, flush=True)
                continue
        step = _ONMT_STEP.search(line)
        if step and first is None:
            first, t0 = int(step.group(1)), time.time()
        msg = format_onmt_line(line, args.max_update, args.name, t0, first)
        if msg:
            print(msg, file=sys.stderr, flush=True)
            continue
        if re.search(r"Error|error:|Traceback|WARNING|done training|Exception", line):
            sys.stderr.write(line)
            sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
