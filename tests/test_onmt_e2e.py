"""End-to-end: OpenNMT-py's real command lines with structattn's attentions (issue 16), CPU only.

A toy task (copy short random-token sentences) goes through stock ``onmt_build_vocab``, ``structattn-onmt-train``
for each attention (softmax, sparsemax, Viterbi −H, Viterbi ℓ2), ``structattn-onmt-translate`` with beam search,
``-attn_debug``, ``-report_align`` and ``-dump_attention`` at batch > 1, and ``structattn-stats`` on the dumps;
then resuming with ``-train_from``, two-process training (gloo, CPU), padded == unpadded translation, weights-only
checkpoint loading and the errors bad option values give before training. Skipped only when OpenNMT-py is not
installed (``bash scripts/install_onmt.sh``; CI installs it).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from structattn_onmt.patches import quiet_onmt_warnings

quiet_onmt_warnings()  # OpenNMT 3.5.1's torch.cuda.amp deprecation warnings, raised on import
try:
    import onmt  # noqa: F401
except ImportError:
    pytest.skip("OpenNMT-py is not installed (bash scripts/install_onmt.sh installs it; CI does)",
                allow_module_level=True)

from structattn.export import read_dump

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

VARIANTS = [
    ("softmax", ["-global_attention_function", "softmax"]),
    ("sparsemax", ["-global_attention_function", "sparsemax"]),
    ("viterbi-entropy", ["-global_attention_function", "viterbi", "-attention_reg", "entropy"]),
    ("viterbi-l2", ["-global_attention_function", "viterbi", "-attention_reg", "l2"]),
    ("fusedmax", ["-global_attention_function", "fusedmax"]),
    ("oscarmax", ["-global_attention_function", "oscarmax", "-attention_lambda", "0.02"]),
    ("entmax15", ["-global_attention_function", "entmax15"]),
    ("sparsemap", ["-global_attention_function", "sparsemap"]),
]
TRAIN_STEPS = 300
#: SparseMAP learns the copy later (3 of 12 exact copies after 300 steps in CI, with the accuracy floor met): 500
STEPS = {"sparsemap": 500}
N_TEST = 12
# target classes: 10 words + </s>; a model that ignores the source is right about 1 time in 10
MIN_VALID_ACCURACY = 60.0

CONFIG = """\
save_data: {root}/run/ex
src_vocab: {root}/run/vocab.src
tgt_vocab: {root}/run/vocab.tgt
overwrite: true
data:
  corpus_1:
    path_src: {root}/train.src
    path_tgt: {root}/train.tgt
  valid:
    path_src: {root}/valid.src
    path_tgt: {root}/valid.tgt
encoder_type: brnn
rnn_type: LSTM
layers: 1
hidden_size: 32
word_vec_size: 16
dropout: [0.0]
batch_size: 32
batch_type: sents
optim: adam
learning_rate: 0.03
num_workers: 0
bucket_size: 1024
seed: 1
report_every: 100
"""


def _cli(name: str) -> list:
    """A console command: the installed script next to this interpreter, else its module (a development
    checkout whose environment was installed before the scripts were declared)."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    modules = {
        "structattn-onmt-train": "from structattn_onmt.cli import train_main as m",
        "structattn-onmt-translate": "from structattn_onmt.cli import translate_main as m",
        "structattn-stats": "from structattn.report.cli import stats_main as m",
        "onmt_build_vocab": "from onmt.bin.build_vocab import main as m",
    }
    return [sys.executable, "-c", f"import sys; {modules[name]}; sys.exit(m())"]


def _env() -> dict:
    """One thread per process (CI has 2 shared cores) and none of the variables that would switch torch.load back
    to weights_only=False: checkpoints must load without them."""
    env = dict(os.environ)
    for k in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run(name: str, *args, check: bool = True, timeout: int = 300, cwd=None) -> subprocess.CompletedProcess:
    cmd = _cli(name) + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def _log(proc) -> str:
    return proc.stdout + proc.stderr


def _valid_accuracies(text: str) -> list:
    return [float(x) for x in re.findall(r"Validation accuracy: ([0-9.]+)", text)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("onmt_toy")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(10)]
    for split, n in (("train", 600), ("valid", 60), ("test", N_TEST)):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))) for _ in range(n)]
        (root / f"{split}.src").write_text("\n".join(lines) + "\n")
        (root / f"{split}.tgt").write_text("\n".join(lines) + "\n")
    (root / "run").mkdir()
    config = root / "toy.yaml"
    config.write_text(CONFIG.format(root=root))
    run("onmt_build_vocab", "-config", config, "-n_sample", "-1")
    assert (root / "run" / "vocab.src").exists()
    return root, config


@pytest.fixture(scope="module")
def trained(toy):
    """One model per attention: {name: (checkpoint, training log)}."""
    root, config = toy
    out = {}
    for name, args in VARIANTS:
        steps = STEPS.get(name, TRAIN_STEPS)
        proc = run("structattn-onmt-train", "-config", config, *args, "-save_model", root / "run" / name,
                   "-train_steps", steps, "-valid_steps", steps // 2, "-save_checkpoint_steps", steps // 2)
        ck = root / "run" / f"{name}_step_{steps}.pt"
        assert ck.exists(), _log(proc)[-3000:]
        out[name] = (ck, _log(proc))
    return out


@pytest.fixture(scope="module")
def translated(toy, trained):
    """Each model translates the test set: beam 3, batches of 5, 2-best, -attn_debug, -report_align, a dump."""
    root, _ = toy
    out = {}
    for name, _ in VARIANTS:
        ck = trained[name][0]
        pred, dump = root / f"pred-{name}.txt", root / f"attn-{name}.jsonl"
        proc = run("structattn-onmt-translate", "-model", ck, "-src", root / "test.src", "-output", pred,
                   "-beam_size", 3, "-batch_size", 5, "-n_best", 2, "-attn_debug", "-report_align",
                   "-dump_attention", dump)
        out[name] = (pred, dump, _log(proc))
    return out


@pytest.mark.parametrize("name", [v[0] for v in VARIANTS])
def test_training_learns(trained, name):
    accs = _valid_accuracies(trained[name][1])
    print(f"{name}: validation accuracy {accs} after {STEPS.get(name, TRAIN_STEPS)} steps")
    assert len(accs) == 2, trained[name][1][-2000:]
    assert accs[-1] >= MIN_VALID_ACCURACY, f"{name}: validation accuracy {accs}"
    health = re.findall(r"structattn attention: attn_fallback ([0-9.]+); attn_frozen ([0-9.]+); T/g", trained[name][1])
    # the fairseq plugin's training metrics, for the attentions with a chain only
    assert bool(health) == (name.startswith("viterbi") or name == "sparsemap")
    if name == "sparsemap":
        assert re.search(r"attn_structures [0-9.]+", trained[name][1])


@pytest.mark.parametrize("name", [v[0] for v in VARIANTS])
def test_translate_beam_attn_debug_report_align_and_dump(toy, translated, name):
    root, _ = toy
    pred, dump, log = translated[name]
    lines = pred.read_text().splitlines()
    assert len(lines) == 2 * N_TEST  # -n_best 2
    # -report_align: "hypothesis ||| src-tgt pairs" with one pair per target token
    for line in lines:
        hyp, _, align = line.partition(" ||| ")
        pairs = align.split()
        assert pairs and len(pairs) == len(hyp.split()), line
        assert all(re.fullmatch(r"\d+-\d+", p) for p in pairs), line
    # -attn_debug printed one matrix per sentence
    assert log.count("</s>") >= N_TEST, log[-2000:]
    meta, records = read_dump(dump)
    assert meta["toolkit"] == "opennmt-py" and meta["generation"]["beam"] == 3
    assert meta["attention"] == name.split("-")[0]
    if name == "oscarmax":  # the checkpoint's opt says which λ the model holds
        assert meta["model_args"][0]["attention_lambda"] == 0.02
    assert sorted({r.id for r in records}) == list(range(N_TEST))
    assert {r.nbest_rank for r in records} == {0, 1}
    src_lines = (root / "test.src").read_text().splitlines()
    best = {r.id: r for r in records if r.nbest_rank == 0}
    exact = 0
    for sid, r in best.items():
        assert r.src_tokens == src_lines[sid].split()  # ids follow the lines of -src
        assert r.attention.shape == (len(r.tgt_tokens), len(r.src_tokens))
        np.testing.assert_allclose(r.attention.sum(1), 1.0, atol=1e-5)
        assert r.hyp_text == lines[2 * sid].partition(" ||| ")[0]  # the -output file's best hypothesis
        exact += r.hyp_text == src_lines[sid]
    assert exact >= N_TEST // 2, f"{name}: only {exact}/{N_TEST} exact copies"


def test_structattn_stats_reads_the_dumps(translated):
    specs = [f"{name}={translated[name][1]}" for name, _ in VARIANTS]
    proc = run("structattn-stats", "--json", *specs)
    stats = {row["label"]: row for row in json.loads(proc.stdout)}
    print({k: round(v["zero_fraction"], 3) for k, v in stats.items()})
    # the sparse attentions have exact zeros (softmax and -H only where float32 underflows)
    for sparse in ("viterbi-l2", "sparsemax", "fusedmax", "oscarmax", "entmax15"):
        assert stats[sparse]["zero_fraction"] > 0.2, sparse
        assert stats[sparse]["zero_fraction"] > stats["softmax"]["zero_fraction"] + 0.1, sparse
    # SparseMAP's active structures per row (the dump's footer); the other dumps do not have the number
    assert 1.0 <= stats["sparsemap"]["structures_per_row"] < 20
    assert "structures_per_row" not in stats["softmax"]
    table = run("structattn-stats", *specs).stdout
    assert "structures/row" in table.splitlines()[0]
    _, l2 = read_dump(translated["viterbi-l2"][1])
    assert any((r.attention == 0).any() for r in l2)


def test_padded_batch_translates_like_one_sentence_at_a_time(toy, trained, translated):
    """Sources are padded inside a batch of 5; alone they are not: same hypotheses, same attention."""
    root, _ = toy
    dump = root / "attn-l2-batch1.jsonl"
    run("structattn-onmt-translate", "-model", trained["viterbi-l2"][0], "-src", root / "test.src",
        "-tgt", root / "test.tgt", "-output", root / "pred-l2-batch1.txt", "-beam_size", 3, "-batch_size", 1,
        "-n_best", 2, "-dump_attention", dump)
    _, alone = read_dump(dump)
    refs = (root / "test.tgt").read_text().splitlines()
    assert [r.extra["ref_text"] for r in alone if r.nbest_rank == 0] == refs  # with -tgt: the references
    _, batched = read_dump(translated["viterbi-l2"][1])
    assert len(alone) == len(batched)
    for a, b in zip(alone, batched):
        assert (a.id, a.nbest_rank, a.tgt_tokens) == (b.id, b.nbest_rank, b.tgt_tokens)
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)
        assert ((a.attention == 0) == (b.attention == 0)).mean() > 0.99


def test_checkpoint_round_trips_under_weights_only_loading(trained):
    """The CLIs above loaded the checkpoints with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD unset; here: torch.load refuses
    an OpenNMT checkpoint without the allow-list, accepts it with exactly argparse.Namespace allowed, and the
    model rebuilt from it holds the checkpoint's tensors (attention transitions included)."""
    import argparse

    import torch

    from structattn_onmt import patches

    ck = trained["viterbi-l2"][0]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(ck)) == ["argparse.Namespace"]
    with pytest.raises(Exception, match="Namespace"):
        torch.load(ck, weights_only=True)
    with patches.allow_onmt_checkpoints():
        saved = torch.load(ck, weights_only=True)
    assert isinstance(saved["opt"], argparse.Namespace)
    assert saved["opt"].global_attention_function == "viterbi" and saved["opt"].attention_reg == "l2"
    tau = saved["model"]["decoder.attn.attention.transitions_over_gamma"]
    assert not torch.equal(tau, torch.eye(2))  # learned away from the contiguity prior
    patches.install()
    import onmt.model_builder
    from onmt.bin.translate import _get_parser

    opt = _get_parser().parse_args(["-model", str(ck), "-src", "unused"])
    _, model, model_opt = onmt.model_builder.load_test_model(opt)
    state = model.state_dict()
    for key, value in saved["model"].items():
        assert torch.equal(state[key].cpu(), value), key
    assert model_opt.attention_gamma == 10.0


def test_train_from_resumes(toy, trained):
    root, config = toy
    ck, first_log = trained["viterbi-l2"]
    proc = run("structattn-onmt-train", "-config", config, *VARIANTS[3][1], "-save_model", root / "run" / "resumed",
               "-train_from", ck, "-train_steps", TRAIN_STEPS + 50, "-valid_steps", 50, "-report_every", 25,
               "-save_checkpoint_steps", 50)
    log = _log(proc)
    assert "Loading checkpoint from" in log
    steps = [int(s) for s in re.findall(r"Step (\d+)/", log)]
    assert steps and steps[0] > TRAIN_STEPS and steps[-1] == TRAIN_STEPS + 50, steps
    # the restored model continues where it was: far above a fresh model's accuracy from its first report on
    first_acc = float(re.search(r"Step \d+/\s*\d+; acc:\s*([0-9.]+)", log).group(1))
    assert first_acc >= MIN_VALID_ACCURACY, log[-2000:]
    assert (root / "run" / f"resumed_step_{TRAIN_STEPS + 50}.pt").exists()


def test_two_process_training_on_cpu(toy):
    root, config = toy
    proc = run("structattn-onmt-train", "-config", config, *VARIANTS[3][1], "-save_model", root / "run" / "dp",
               "-train_steps", 20, "-valid_steps", 20, "-save_checkpoint_steps", 20, "-report_every", 10,
               "-world_size", 2, "-gpu_ranks", 0, 1, "-gpu_backend", "gloo", "-master_port", _free_port())
    log = _log(proc)
    assert log.count("Starting process pid") == 2, log[-3000:]
    # statistics are gathered over both ranks: 10 steps x 32 sentences x 2 ranks
    sents = [int(s) for s in re.findall(r"sents:\s*(\d+)", log)]
    assert sents and all(s > 320 for s in sents), (sents, log[-3000:])
    ck = root / "run" / "dp_step_20.pt"
    assert ck.exists(), log[-3000:]
    from structattn_onmt import patches

    with patches.allow_onmt_checkpoints():
        import torch

        saved = torch.load(ck, weights_only=True)
    assert saved["opt"].world_size == 2 and "decoder.attn.attention.transitions_over_gamma" in saved["model"]


def test_bad_values_stop_before_training(toy, tmp_path):
    """A bad value in a YAML config: one error line naming the option, exit status 2, nothing trained."""
    root, config = toy
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text() + "global_attention_function: viterbi\nattention_gamma: 0\n")
    proc = run("structattn-onmt-train", "-config", bad, "-save_model", tmp_path / "m", "-train_steps", 5,
               check=False)
    assert proc.returncode == 2, _log(proc)[-2000:]
    assert "error: argument --attention_gamma/-attention_gamma: must be a finite number > 0, got '0'" in proc.stderr
    assert "Starting training" not in _log(proc) and not list(tmp_path.glob("m*.pt"))
    proc = run("structattn-onmt-train", "-config", config, "-global_attention_function", "oscarmax",
               "-attention_lambda", "-0.5", "-save_model", tmp_path / "m", "-train_steps", 5, check=False)
    assert proc.returncode == 2, _log(proc)[-2000:]
    assert "error: argument --attention_lambda/-attention_lambda: must be a finite number >= 0, got '-0.5'" \
        in proc.stderr
