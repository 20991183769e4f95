"""Misuse of the command lines: short, clear errors, no traceback, no partial output (docs/reliability.md).

* fairseq-train / fairseq-generate with the plugin (real CLIs, subprocesses run two at a time): bad --attention,
  γ ≤ 0 / nan / text, missing data directory or checkpoint, --bf16 / --fp16 on CPU, --dump-attention given to
  fairseq-train (an existing PATH must survive) or pointing into a missing, read-only directory or at a directory.
* structattn-stats / -plot / -report on missing, empty, truncated, footer-less, corrupted dumps and directories
  (in-process; the one-line message and exit status 1, no output folder).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from structattn.options import ATTENTIONS

from fairseq_helpers import ROOT, USER_DIR, cli_env

SMALL = ["--encoder-embed-dim", "16", "--encoder-hidden-size", "16", "--decoder-embed-dim", "16",
         "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16"]


def _error_lines(stderr: str) -> list:
    """stderr without fairseq's log lines (INFO about optional packages, printed by every fairseq CLI)."""
    return [line for line in stderr.splitlines() if line.strip() and " | INFO | " not in line
            and not line.startswith("INFO:")]


def _read_only_dir(path: Path):
    """A directory this process cannot create files in: permission bits, or (as root, who ignores them) the
    immutable attribute. None if neither works here."""
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / "probe").touch()
    except OSError:
        return path
    (path / "probe").unlink()
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return path
    return None


def _release(ro):
    if ro is not None:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        ro.chmod(0o755)


@pytest.fixture
def setup(tmp_path):
    """Everything the checks look at exists but is fake: they run before fairseq reads any of it. An earlier dump
    (old.jsonl) that must survive every failed command; a read-only directory."""
    (tmp_path / "data").mkdir()
    (tmp_path / "fake.pt").write_bytes(b"")
    (tmp_path / "old.jsonl").write_text("an earlier dump\n")
    ro = _read_only_dir(tmp_path / "ro")
    yield tmp_path, ro
    _release(ro)


def _train(t, *extra, data=None):
    return ["train", data or t / "data", "--user-dir", USER_DIR, "--arch", "structattn_lstm", *SMALL,
            "--optimizer", "adam", "--lr", "0.01", "--batch-size", "16", "--max-update", "2", "--cpu",
            "--num-workers", "0", "--criterion", "cross_entropy", "--save-dir", t / "ck", *extra]


def _generate(t, *extra, data=None, path=None):
    return ["generate", data or t / "data", "--user-dir", USER_DIR, "--task", "structattn_translation",
            "--path", path or t / "fake.pt", "--gen-subset", "test", "--cpu", "--batch-size", "4", *extra]


def _cases(t, ro):
    """name: (command, expected part of the last stderr line, our check (one stderr line))."""
    cases = {
        "attention dot": (_train(t, "--attention", "dot"), "argument --attention: invalid choice: 'dot' (choose "
                          "from " + ", ".join(repr(a) for a in ATTENTIONS) + ")", False),
        "reg l1": (_train(t, "--attention-reg", "l1"), "argument --attention-reg: invalid choice: 'l1'", False),
        "gamma 0": (_train(t, "--attention-gamma", "0"), "argument --attention-gamma: must be a finite number > 0, "
                    "got '0'", False),
        "gamma -1": (_train(t, "--attention-gamma", "-1"), "must be a finite number > 0, got '-1'", False),
        "gamma nan": (_train(t, "--attention-gamma", "nan"), "must be a finite number > 0, got 'nan'", False),
        "gamma inf": (_train(t, "--attention-gamma", "inf"), "must be a finite number > 0, got 'inf'", False),
        "gamma text": (_train(t, "--attention-gamma", "two"), "must be a number > 0, got 'two'", False),
        "missing data": (_train(t, data=t / "nodata"), f"data directory '{t / 'nodata'}' does not exist (give the "
                         "--destdir of fairseq-preprocess)", True),
        "data is a file": (_train(t, data=t / "fake.pt"), f"data directory '{t / 'fake.pt'}' is not a directory",
                           True),
        "bf16 cpu": (_train(t, "--bf16"), "--bf16 is not supported here: in fairseq 0.12 it implies --tpu and needs "
                     "torch_xla", True),
        "memory-efficient bf16": (_train(t, "--memory-efficient-bf16"), "--bf16 is not supported here", True),
        "fp16 cpu": (_train(t, "--fp16"), "--fp16 needs a CUDA GPU (fairseq's FP16Optimizer keeps fp32 master "
                     "weights on it); on CPU use --memory-efficient-fp16", True),
        "dump at train": (_train(t, "--task", "structattn_translation", "--dump-attention", t / "old.jsonl"),
                          "--dump-attention works with fairseq-generate only (one pass over --gen-subset); remove "
                          "it from this fairseq-train command", True),
        "dump missing dir": (_generate(t, "--dump-attention", t / "nodir" / "x.jsonl"),
                             f"directory '{t / 'nodir'}' does not exist", True),
        "dump is dir": (_generate(t, "--dump-attention", t), f"cannot write attention dump '{t}': it is a directory; give a file "
                        "name", True),
        "dump heads without dump": (_generate(t, "--dump-attention-heads", "all"), "--dump-attention-layer/"
                                    "--dump-attention-heads choose what --dump-attention writes; give "
                                    "--dump-attention PATH too", True),
        "missing checkpoint": (_generate(t, path=t / "nope.pt"), f"--path: checkpoint file '{t / 'nope.pt'}' not "
                               "found", True),
        "generate missing data": (_generate(t, data=t / "nodata"), f"data directory '{t / 'nodata'}' does not "
                                  "exist", True),
    }
    if ro is not None:
        cases["dump read-only dir"] = (_generate(t, "--dump-attention", ro / "x.jsonl"),
                                       f"cannot create files in '{ro}'", True)
    return cases


def _check(name, returncode, stderr, expected, ours):
    lines = _error_lines(stderr)
    assert returncode == 2, f"{name}: exit {returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, f"{name}: traceback\n{stderr[-3000:]}"
    assert lines and ": error: " in lines[-1] and expected in lines[-1], f"{name}: last line {lines[-1:]!r}"
    if ours:  # the plugin's checks print one line, not argparse's 100-line usage
        assert len(lines) == 1, f"{name}: {len(lines)} lines of stderr"


def _nothing_written(t, ro):
    assert (t / "old.jsonl").read_text() == "an earlier dump\n"
    assert sorted(p.name for p in t.iterdir()) == sorted(["data", "fake.pt", "old.jsonl"] + (["ro"] if ro else []))
    assert not list((t / "data").iterdir())
    if ro is not None:
        assert not list(ro.iterdir())


def test_cli_misuse_in_process(setup, capsys, monkeypatch):
    """Every case through fairseq's own cli_main (argument parsing, the plugin's checks), in this process."""
    pytest.importorskip("fairseq")
    import fairseq_cli.generate
    import fairseq_cli.train

    t, ro = setup
    mains = {"train": fairseq_cli.train.cli_main, "generate": fairseq_cli.generate.cli_main}
    for name, (cmd, expected, ours) in _cases(t, ro).items():
        monkeypatch.setattr(sys, "argv", [f"fairseq-{cmd[0]}", *[str(a) for a in cmd[1:]]])
        with pytest.raises(SystemExit) as exc:
            mains[cmd[0]]()
        _check(name, exc.value.code, capsys.readouterr().err, expected, ours)
    _nothing_written(t, ro)


@pytest.mark.slow
def test_cli_misuse_real_commands(setup):
    """The same through real subprocesses (no traceback on stderr) for one argparse error, the fairseq-train
    --dump-attention case (an existing PATH used to be deleted) and a read-only dump directory."""
    pytest.importorskip("fairseq")
    t, ro = setup
    cases = _cases(t, ro)
    names = ["gamma nan", "dump at train", "dump read-only dir" if ro is not None else "dump missing dir"]

    def run(cmd):
        full = [sys.executable, "-m", f"fairseq_cli.{cmd[0]}", *[str(a) for a in cmd[1:]]]
        return subprocess.run(full, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(run, [cases[n][0] for n in names]))
    for name, proc in zip(names, procs):
        _check(name, proc.returncode, proc.stderr, cases[name][1], cases[name][2])
        assert "H-" not in proc.stdout
    _nothing_written(t, ro)


# ---- report CLIs on bad dumps -----------------------------------------------------------------------------------


@pytest.fixture
def bad_dumps(tmp_path):
    from structattn.export import AttentionRecord, write_dump

    rec = AttentionRecord(id=0, nbest_rank=0, src_tokens=["a", "</s>"], tgt_tokens=["A", "</s>"], src_text="a",
                          hyp_text="A", attention=np.eye(2, dtype=np.float32), score=-1.0, extra={})
    good = tmp_path / "good.jsonl"
    write_dump(good, {"arch": "structattn_lstm"}, [rec])
    data = good.read_bytes()
    lines = data.split(b"\n")
    files = {
        "missing": (tmp_path / "missing.jsonl", "dump not found"),
        "empty": (tmp_path / "empty.jsonl", "empty file; the writer did not finish"),
        "truncated": (tmp_path / "cut.jsonl", "truncated (no final newline); the writer did not finish"),
        "no footer": (tmp_path / "nofooter.jsonl", "no completion footer; the writer was killed or failed"),
        "killed tmp": (tmp_path / "x.jsonl.tmp-123", "no completion footer"),
        "garbage": (tmp_path / "garbage.jsonl", "not a JSON line"),
        "modified": (tmp_path / "modified.jsonl", "checksum mismatch; the file was modified or corrupted"),
        "directory": (tmp_path / "adir", "is a directory, not an attention dump"),
    }
    files["empty"][0].write_bytes(b"")
    files["truncated"][0].write_bytes(data[: len(data) // 2])
    files["no footer"][0].write_bytes(b"\n".join(lines[:-2]) + b"\n")
    files["killed tmp"][0].write_bytes(b"\n".join(lines[:-2]) + b"\n")
    files["garbage"][0].write_bytes(b"\x00\xffnot json\n")
    files["modified"][0].write_bytes(data.replace(b'"hyp_text":"A"', b'"hyp_text":"B"'))
    files["directory"][0].mkdir()
    return good, files


@pytest.mark.parametrize("cli", ["stats", "plot", "report"])
def test_report_clis_on_missing_and_damaged_dumps(bad_dumps, tmp_path, capsys, cli):
    from structattn.report.cli import plot_main, report_main, stats_main

    main = {"stats": stats_main, "plot": plot_main, "report": report_main}[cli]
    good, files = bad_dumps
    out = tmp_path / "out"
    for name, (path, message) in files.items():
        args = [f"ok={good}", f"bad={path}"] if cli == "report" else [str(path)]
        if cli != "stats":
            args += ["-o", str(out)]
        assert main(args) == 1, name
        err = capsys.readouterr().err
        assert err.startswith(f"structattn-{cli}: error: ") and message in err, f"{name}: {err!r}"
        assert len(err.strip().splitlines()) == 1, f"{name}: {err!r}"
        assert not out.exists(), f"{name}: partial output"
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], f"{name}: staging folder left"


def test_checks_only_apply_to_command_lines_that_load_the_plugin(tmp_path):
    """Once imported, the plugin's parse hook stays in fairseq for the whole process; command lines without
    --user-dir (other tools, other tests) must parse exactly as before."""
    pytest.importorskip("fairseq")
    sys.path.insert(0, str(ROOT))
    import structattn_fairseq  # noqa: F401  (installs the hook: structattn_fairseq.fairseq_patches)
    from fairseq import options

    args = options.parse_args_and_arch(options.get_training_parser(), [str(tmp_path / "nodata"), "--arch", "lstm",
                                                                      "--fp16", "--cpu"])
    assert args.data == str(tmp_path / "nodata") and args.fp16


@pytest.mark.slow
def test_interactive_translates_empty_blank_and_500_token_lines(tmp_path):
    """What users type: an empty line, a line of spaces and a 500-token line in one batch with a short one. Each
    gets a hypothesis (fairseq appends EOS, so an 'empty' source is one token); nothing fails."""
    pytest.importorskip("fairseq")
    import random

    from fairseq_helpers import make_toy_data, preprocess, run_cli, train

    make_toy_data(tmp_path / "raw", n_train=64, n_valid=8, n_test=4)
    preprocess(tmp_path / "raw", tmp_path / "bin")
    train(tmp_path / "bin", tmp_path / "ck", ["--attention", "viterbi", "--attention-reg", "l2"], 2,
          ["--disable-validation"])
    rng = random.Random(0)
    long_line = " ".join(f"w{rng.randrange(10)}" for _ in range(500))
    proc = run_cli("interactive", tmp_path / "bin", "--user-dir", USER_DIR, "--path", tmp_path / "ck" /
                   "checkpoint_last.pt", "--source-lang", "src", "--target-lang", "tgt", "--cpu", "--beam", "2",
                   "--buffer-size", "4", "--batch-size", "4", "--max-len-b", "10",
                   stdin=f"\nw1 w2\n{long_line}\n   \n")
    hyps = {int(line.split("\t")[0][2:]): line for line in proc.stdout.splitlines() if line.startswith("H-")}
    assert sorted(hyps) == [0, 1, 2, 3], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
