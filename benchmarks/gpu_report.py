#!/usr/bin/env python
"""Assemble the report of ``scripts/gpu_check.sh`` (format documented in docs/speed.md, "GPU check report").

    python benchmarks/gpu_report.py --work DIR --out REPORT.md [--total-seconds N] [--command TEXT]

``DIR`` is the script's work folder:

* ``env.txt`` — ``key<TAB>value`` lines of the environment probe (python, torch, torch CUDA, cuda available, gpu,
  triton, nvidia-smi, commit, cpu, device);
* ``steps.tsv`` — one ``name<TAB>status<TAB>seconds<TAB>note<TAB>artifact`` line per step, status PASS, FAIL or
  SKIP, artifact a file name in DIR or ``-``;
* the artifacts and ``<step>.log`` files: ``tests.log`` (pytest output), ``step.md`` (benchmarks/run.py report),
  ``normaliser.log`` (benchmarks/normalizer.py table), ``train.md`` (benchmarks/run.py --e2e-only report).

Sections whose step did not pass say why instead of showing numbers; the tail of every failed step's log is
appended. Only the standard library is used, so a broken torch install still gets a report.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

STEP_TITLES = {
    "install": "install",
    "tests": "CUDA tests",
    "step": "step-level benchmark",
    "normaliser": "normaliser benchmark",
    "train": "fairseq-train",
}
LOG_TAIL = 60


def read_env(work: str) -> dict:
    env = {}
    path = os.path.join(work, "env.txt")
    if os.path.exists(path):
        for line in open(path, encoding="utf-8", errors="replace"):
            if "\t" in line:
                k, v = line.rstrip("\n").split("\t", 1)
                env[k] = v
    return env


def read_steps(work: str) -> list[dict]:
    steps = []
    path = os.path.join(work, "steps.tsv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no steps recorded")
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 5 or fields[1] not in ("PASS", "FAIL", "SKIP"):
            raise ValueError(f"{path}:{n}: expected name, PASS|FAIL|SKIP, seconds, note, artifact; got {line!r}")
        name, status, seconds, note, artifact = fields
        steps.append({"name": name, "status": status, "seconds": int(seconds), "note": note, "artifact": artifact})
    return steps


def _read(work: str, name: str) -> str | None:
    path = os.path.join(work, name)
    if name in ("", "-") or not os.path.exists(path):
        return None
    return open(path, encoding="utf-8", errors="replace").read()


def _section(text: str, start: str, stop: str | None) -> str:
    """The lines of ``text`` from the heading starting with ``start`` (exclusive) to the next ``stop`` heading."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(start):
            body = []
            for line2 in lines[i + 1:]:
                if stop is not None and line2.startswith(stop):
                    break
                body.append(line2)
            return "\n".join(body).strip()
    return ""


def _table_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("|") or line.startswith("B=")).strip()


def verdict(env: dict, steps: list[dict]) -> str:
    failed = [s["name"] for s in steps if s["status"] == "FAIL"]
    if env.get("device", "cuda") == "cuda" and env.get("cuda available") != "True":
        return "NO GPU — no CUDA device was visible; nothing was measured"
    if failed:
        return "FAIL — " + ", ".join(failed)
    if env.get("device") == "cpu":
        return "REHEARSAL ON CPU — every step that ran passed, but these are not GPU numbers"
    if any(s["status"] == "SKIP" for s in steps):
        return "PASS (some steps skipped)"
    return "PASS"


def _fmt_s(seconds: int) -> str:
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def build_report(work: str, total_seconds: int | None = None, command: str = "scripts/gpu_check.sh",
                 now: datetime.datetime | None = None) -> str:
    env = read_env(work)
    steps = read_steps(work)
    by_name = {s["name"]: s for s in steps}
    now = now or datetime.datetime.now(datetime.timezone.utc)
    out = ["# structattn GPU check", ""]
    out.append(f"- date: {now.strftime('%Y-%m-%d %H:%M UTC')}; command: `{command}`"
               + (f"; total {_fmt_s(total_seconds)}" if total_seconds is not None else ""))
    out.append(f"- commit: {env.get('commit', 'unknown')}; device: {env.get('device', 'cuda')}")
    out.append(f"- GPU: {env.get('gpu', 'none')}; nvidia-smi: {env.get('nvidia-smi', 'n/a')}")
    out.append(f"- torch {env.get('torch', '?')} (CUDA {env.get('torch CUDA', '?')}), triton {env.get('triton', '?')}, "
               f"Python {env.get('python', '?')}; CPU: {env.get('cpu', '?')}")
    out.append(f"- **verdict: {verdict(env, steps)}**")
    out += ["", "## Steps", "", "| step | status | time | note |", "|---|---|---|---|"]
    for s in steps:
        out.append(f"| {STEP_TITLES.get(s['name'], s['name'])} | {s['status']} | {_fmt_s(s['seconds'])} | "
                   f"{s['note'] or ''} |")

    def body(name: str, render) -> list[str]:
        s = by_name.get(name)
        if s is None:
            return ["Not run."]
        if s["status"] == "SKIP":
            return [f"Skipped ({s['note']})."]
        if s["status"] == "FAIL":
            return [f"**Failed** ({s['note']}); log tail below."]
        text = _read(work, s["artifact"])
        if text is None:
            return [f"Passed, but its output `{s['artifact']}` is missing."]
        return [render(text)]

    def tests(text):
        lines = [ln for ln in text.splitlines() if ln.strip()]
        keep = [ln for ln in lines if ln.startswith("SKIPPED")] + lines[-1:]
        return "```\n" + "\n".join(keep) + "\n```"

    def normaliser(text):
        return _table_lines(text)

    def train(text):
        return _section(text, "## End to end", "## ") or text.strip()

    out += ["", "## CUDA tests", ""] + body("tests", tests)
    out += ["", "## Step-level benchmark (one decoder-step attention, forward + backward; ratios to softmax in the "
            "same run)", ""] + body("step", lambda t: _section(t, "## Step level", "## End to end"))
    out += ["", "## Normaliser alone (scores → weights, forward + backward; ratios to softmax in the same run)",
            ""] + body("normaliser", normaliser)
    out += ["", "## fairseq-train (tokens/s and peak memory per attention; ratios to softmax in the same run)",
            ""] + body("train", train)
    failed = [s for s in steps if s["status"] == "FAIL"]
    if failed:
        out += ["", "## Logs of failed steps"]
        for s in failed:
            log = _read(work, f"{s['name']}.log") or "(no log)"
            tail = "\n".join(log.splitlines()[-LOG_TAIL:])
            out += ["", f"### {STEP_TITLES.get(s['name'], s['name'])} (last {LOG_TAIL} lines)", "", "```", tail, "```"]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="the gpu_check.sh work folder")
    ap.add_argument("--out", required=True, help="report file to write")
    ap.add_argument("--total-seconds", type=int, default=None)
    ap.add_argument("--command", default="scripts/gpu_check.sh")
    args = ap.parse_args(argv)
    try:
        text = build_report(args.work, args.total_seconds, args.command)
    except (OSError, ValueError) as exc:
        print(f"gpu_report.py: {exc}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
