"""The wheel, installed outside the clone: fairseq trains and translates with ``--user-dir "$(structattn-user-dir)"``
and OpenNMT-py with ``structattn-onmt-train`` / ``structattn-onmt-translate`` (issue 24's acceptance test).

The wheel is built with ``python -m build --wheel`` into a temporary folder and installed with ``--no-deps`` into a
fresh venv; torch, fairseq and OpenNMT-py come from the test interpreter's environment through a ``.pth`` file
naming its site-packages (a plain path line: the editable-install hooks of that environment do not run), so
nothing is downloaded. Every command runs with its working directory outside the clone and no PYTHONPATH, and the
test checks that ``structattn`` is imported from the new venv, not from the clone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fairseq_helpers import hypotheses, make_toy_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=900):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    if os.environ.get("CI") == "true":  # CI installs the `test` extra, which has build: a skip there hides a bug
        import build  # noqa: F401
    else:
        pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    # build from a copy of the tracked files, so that the clone's build/ and *.egg-info are neither used nor touched
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((ROOT / f).read_bytes())
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp / "dist"], src, env)
    wheel = next((tmp / "dist").glob("structattn-*.whl"))
    v = tmp / "venv"
    _run([sys.executable, "-m", "venv", v], tmp, env)
    py = v / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "host_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp, env)
    env["PATH"] = f"{v / 'bin'}{os.pathsep}{env['PATH']}"
    work = tmp / "work"
    work.mkdir()
    where = _run([py, "-c", "import structattn, structattn_fairseq, structattn_onmt as o; "
                  "print(structattn.__file__, structattn_fairseq.__file__, o.__file__)"], work, env).stdout.split()
    assert all(Path(w).is_relative_to(v) for w in where), where
    return v, env, work


def test_wheel_plugin_trains_and_translates_with_fairseq(venv):
    v, env, work = venv
    user_dir = _run([v / "bin" / "structattn-user-dir"], work, env).stdout.strip()
    assert Path(user_dir).is_relative_to(v) and Path(user_dir).name == "structattn_fairseq"
    assert _run([v / "bin" / "structattn-user-dir", "--version"], work, env).stdout.startswith("structattn ")
    raw, data, ck = work / "raw", work / "bin", work / "ck"
    make_toy_data(raw, n_train=64, n_valid=8, n_test=8, seed=5)
    py = v / "bin" / "python"
    _run([py, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref",
          raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test", "--destdir", data,
          "--joined-dictionary", "--workers", "1"], work, env)
    _run([py, "-m", "fairseq_cli.train", data, "--user-dir", user_dir, "--arch", "structattn_lstm",
          "--attention", "viterbi", "--attention-reg", "l2", "--encoder-embed-dim", "16", "--encoder-hidden-size",
          "16", "--decoder-embed-dim", "16", "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16",
          "--optimizer", "adam", "--lr", "0.01", "--batch-size", "16", "--max-update", "3", "--save-dir", ck,
          "--cpu", "--num-workers", "0", "--no-progress-bar", "--no-epoch-checkpoints",
          "--criterion", "cross_entropy"], work, env)
    out = _run([py, "-m", "fairseq_cli.generate", data, "--user-dir", user_dir, "--path", ck / "checkpoint_last.pt",
                "--gen-subset", "test", "--beam", "2", "--cpu", "--batch-size", "8"], work, env).stdout
    assert sorted(hypotheses(out)) == list(range(8))


def test_wheel_onmt_glue_trains_and_translates(venv):
    if os.environ.get("CI") != "true":  # CI installs OpenNMT-py (scripts/install_onmt.sh)
        pytest.importorskip("onmt")
    from test_onmt_e2e import CONFIG

    v, env, work = venv
    root = work / "onmt"
    make_toy_data(root, task="copy", n_train=64, n_valid=8, n_test=5, seed=6)
    for split in ("train", "valid", "test"):  # the OpenNMT config reads {split}.src / {split}.tgt, as written
        assert (root / f"{split}.src").exists()
    (root / "run").mkdir()
    config = root / "toy.yaml"
    config.write_text(CONFIG.format(root=root))
    _run([v / "bin" / "python", "-c", "import sys; from onmt.bin.build_vocab import main; sys.exit(main())",
          "-config", config, "-n_sample", "-1"], work, env)
    _run([v / "bin" / "structattn-onmt-train", "-config", config, "-global_attention_function", "viterbi",
          "-attention_reg", "l2", "-save_model", root / "run" / "m", "-train_steps", "4", "-valid_steps", "4",
          "-save_checkpoint_steps", "4"], work, env)
    pred = root / "pred.txt"
    _run([v / "bin" / "structattn-onmt-translate", "-model", root / "run" / "m_step_4.pt", "-src",
          root / "test.src", "-output", pred, "-beam_size", "2"], work, env)
    assert len(pred.read_text().splitlines()) == 5
