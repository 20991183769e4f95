"""Data-parallel training of ``structattn_lstm`` under fairseq's DDP, with 2 CPU ranks (gloo).

What is proved (docs/distributed.md, "Training on several GPUs or machines"):

* the launch documented for CPU processes really forms one process group of world size 2 (``torchrun`` plus the
  flags in :data:`CPU_DDP_FLAGS`, byte for byte the ones in the docs — checked by ``test_docs_show_the_tested_flags``);
* each rank trains on half of the batches: per update, rank 0 and rank 1 see disjoint batches whose union is what a
  single process sees;
* both ranks end with bitwise identical parameters (fairseq's ``legacy_ddp`` does *not* broadcast the initial
  parameters, so this also checks that every rank builds the same model from ``--seed``);
* the result equals a single-process run with the same effective batch (1 process, ``--update-freq 2``), to
  ``atol=1e-6, rtol=1e-5`` — summation-order slack; measured difference: exactly 0 (the DDP average (g0 + g1)/2
  rescaled by 2/S and the accumulated (g0 + g1) rescaled by 1/S differ only by exact powers of two);
* every parameter receives a gradient in every step for every attention, so ``pytorch_ddp`` (fairseq's default
  on GPUs) needs no ``--find-unused-parameters``; parameter registration is deterministic.

Instead of the ``fairseq-train`` console script the launcher runs a probe script that is ``fairseq-train``
(``fairseq_cli.train.cli_main``) plus an observer: it records the sample ids of every batch a rank trains on and
saves that rank's final parameters. The fairseq arguments are identical.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fairseq")

REPO = Path(__file__).resolve().parents[1]
USER_DIR = REPO / "structattn_fairseq"
DOC = REPO / "docs" / "distributed.md"

#: The CPU data-parallel flags documented in docs/distributed.md (same order, same spelling).
CPU_DDP_FLAGS = [
    "--cpu", "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
    "--distributed-init-method", "env://", "--distributed-no-spawn", "--distributed-rank", "-1",
]

#: Tiny model and run: 16-dim embeddings, no dropout (with dropout, a rank and the single process would draw
#: different masks for the second half-batch: fairseq seeds every step with seed + num_updates on every rank).
TRAIN_ARGS = [
    "--user-dir", str(USER_DIR), "--arch", "structattn_lstm",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--decoder-out-embed-dim", "16", "--dropout", "0",
    "--optimizer", "adam", "--lr", "0.01", "--max-tokens", "200", "--max-update", "3",
    "--no-save", "--disable-validation", "--seed", "1", "--log-format", "simple", "--log-interval", "1",
]

ATTENTIONS = {
    "viterbi-entropy": ["--attention", "viterbi", "--attention-reg", "entropy"],
    "viterbi-l2": ["--attention", "viterbi", "--attention-reg", "l2"],
    "softmax": ["--attention", "softmax"],
    "sparsemax": ["--attention", "sparsemax"],
}

PROBE = r'''
"""fairseq-train (fairseq_cli.train.cli_main) + an observer that records batches and final parameters per rank."""
import os
import torch
import fairseq.trainer

_seen = {"batches": [], "trainer": None, "initial": None}
_train_step = fairseq.trainer.Trainer.train_step


def train_step(self, samples, raise_oom=False):
    if _seen["trainer"] is None:
        _seen["trainer"] = self
        _seen["initial"] = {k: v.detach().clone() for k, v in self.get_model().state_dict().items()}
    # one entry per micro-batch (--update-freq); fairseq's padding dummy batch on an uneven last step is {}
    _seen["batches"].append([s["id"].tolist() if s else [] for s in samples])
    return _train_step(self, samples, raise_oom=raise_oom)


fairseq.trainer.Trainer.train_step = train_step

from fairseq_cli.train import cli_main  # noqa: E402

cli_main()

import torch.distributed as dist  # noqa: E402

rank = dist.get_rank() if dist.is_initialized() else 0
trainer = _seen["trainer"]
torch.save(
    {
        "rank": rank,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "batches": _seen["batches"],
        "num_updates": trainer.get_num_updates(),
        "initial": _seen["initial"],
        "params": {k: v.detach().clone() for k, v in trainer.get_model().state_dict().items()},
    },
    os.path.join(os.environ["PROBE_DIR"], f"rank{rank}.pt"),
)
'''


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks on 2 cores
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(cmd, cwd, timeout=300, env=None):
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed (rc {proc.returncode}):\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    """Copy task (target = source), 256 training pairs of 3–8 tokens over 12 symbols, binarised by fairseq."""
    root = tmp_path_factory.mktemp("copy")
    rng = random.Random(0)
    vocab = [chr(ord("a") + i) for i in range(12)]
    for split, n in (("train", 256), ("valid", 16)):
        lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        for side in ("src", "tgt"):
            (root / f"{split}.{side}").write_text("\n".join(lines) + "\n")
    _run([sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt",
          "--trainpref", "train", "--validpref", "valid", "--destdir", "bin", "--joined-dictionary",
          "--workers", "1"], cwd=root)
    (root / "probe.py").write_text(PROBE)
    return root


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(probe_dir: Path, rank: int):
    return torch.load(probe_dir / f"rank{rank}.pt", weights_only=False)


def _train_two_ranks(root: Path, name: str, extra: list[str]):
    """The documented single-machine CPU launch (torchrun ≡ python -m torch.distributed.run)."""
    out = root / f"ddp-{name}"
    out.mkdir()
    env = _env()
    env["PROBE_DIR"] = str(out)
    log = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "probe.py", "bin", *TRAIN_ARGS, *extra, *CPU_DDP_FLAGS, "--distributed-world-size", "2"],
               cwd=root, env=env)
    return log, _load(out, 0), _load(out, 1)


def _train_single(root: Path, name: str, extra: list[str]):
    out = root / f"single-{name}"
    out.mkdir()
    env = _env()
    env["PROBE_DIR"] = str(out)
    log = _run([sys.executable, "probe.py", "bin", *TRAIN_ARGS, *extra, "--cpu", "--update-freq", "2"],
               cwd=root, env=env)
    return log, _load(out, 0)


def _assert_data_parallel(log, r0, r1, single):
    # one process group of world size 2, fairseq agrees
    assert "training on 2 devices" in log, log[-3000:]
    assert (r0["rank"], r0["world_size"], r1["rank"], r1["world_size"]) == (0, 2, 1, 2)
    assert r0["num_updates"] == r1["num_updates"] == single["num_updates"] == 3

    # each rank trains on half of the batches: one micro-batch per update, disjoint across ranks, and together
    # exactly the two micro-batches the single process (--update-freq 2) accumulates in that update
    assert single["world_size"] == 1
    for step, (b0, b1, bs) in enumerate(zip(r0["batches"], r1["batches"], single["batches"], strict=True)):
        assert len(b0) == len(b1) == 1 and len(bs) == 2, step
        assert b0[0] and b1[0] and not set(b0[0]) & set(b1[0]), f"update {step}: ranks share sentences"
        assert [b0[0], b1[0]] == bs, f"update {step}: ranks' batches differ from the single process's"
    seen = [i for step in r0["batches"] + r1["batches"] for i in step[0]]
    assert len(seen) == len(set(seen))

    # the ranks agree bit for bit, training moved the parameters, and the run equals the single-process one
    assert r0["params"].keys() == r1["params"].keys() == single["params"].keys()
    for name in r0["params"]:
        assert torch.equal(r0["initial"][name], r1["initial"][name]), f"{name}: ranks started differently"
        assert torch.equal(r0["params"][name], r1["params"][name]), f"{name}: ranks ended differently"
        torch.testing.assert_close(r0["params"][name], single["params"][name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: 2 ranks != 1 process with --update-freq 2: {m}")
    # sparsemax's temperature is a constant buffer of the state dict, not a trained parameter
    trained = [n for n in r0["params"] if not n.endswith(".temperature")]
    moved = sum(int(not torch.equal(r0["initial"][n], r0["params"][n])) for n in trained)
    assert trained and moved == len(trained), "some parameters never changed: the comparison would prove little"


# CI budget (~90 s on 2 cores): the 2-rank launch runs the Viterbi attention (entropy) and sparsemax; the two-machine
# launch runs Viterbi with l2; softmax shares the scoring and DDP path of sparsemax and is covered by the
# in-process gradient/registration test below, like every attention.
@pytest.mark.slow
@pytest.mark.parametrize("attention", ["viterbi-entropy", "sparsemax"])
def test_two_cpu_ranks_are_data_parallel(copy_data, attention):
    log, r0, r1 = _train_two_ranks(copy_data, attention, ATTENTIONS[attention])
    _, single = _train_single(copy_data, attention, ATTENTIONS[attention])
    _assert_data_parallel(log, r0, r1, single)


@pytest.mark.slow
def test_two_machines_one_cpu_rank_each(copy_data):
    """The documented multi-node launch (torchrun --nnodes/--node_rank/--master_addr), two "machines" on
    localhost with one process each, with the l2 Viterbi attention."""
    out = copy_data / "ddp-2nodes"
    out.mkdir()
    env = _env()
    env["PROBE_DIR"] = str(out)
    port = str(_free_port())
    extra = ATTENTIONS["viterbi-l2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", port, "--nproc_per_node", "1",
             "probe.py", "bin", *TRAIN_ARGS, *extra, *CPU_DDP_FLAGS, "--distributed-world-size", "2"],
            cwd=copy_data, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {node} failed:\n{log[-6000:]}"
    _, single = _train_single(copy_data, "2nodes", extra)
    _assert_data_parallel(logs[0], _load(out, 0), _load(out, 1), single)


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_every_parameter_gets_a_gradient_and_registration_is_deterministic(copy_data, attention):
    """What torch's DistributedDataParallel (``--ddp-backend pytorch_ddp``, fairseq's default on GPUs) needs:
    every registered parameter takes part in the loss of every step (else its reducer stalls or errors unless
    ``--find-unused-parameters``), and every rank registers the same parameters in the same order."""
    from fairseq import options, tasks

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(copy_data / "bin"), *TRAIN_ARGS, *ATTENTIONS[attention], "--cpu"])
    task = tasks.setup_task(args)
    task.load_dataset("train")

    def build():
        torch.manual_seed(1)
        return task.build_model(args)

    model, twin = build(), build()
    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert names == [(n, tuple(p.shape)) for n, p in twin.named_parameters()]
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), f"{n}: same seed, different initial values"

    criterion = task.build_criterion(args)
    batches = task.get_batch_iterator(task.dataset("train"), max_tokens=200, seed=1).next_epoch_itr(shuffle=True)
    model.train()
    for step, sample in zip(range(2), batches):
        model.zero_grad(set_to_none=True)
        loss, _, _ = criterion(model, sample)
        loss.backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"step {step}: parameters outside the graph (DDP would need --find-unused-parameters): {unused}"


def test_docs_show_the_tested_flags():
    """docs/distributed.md must show the flags this file runs (a drifted doc is a broken doc)."""
    text = re.sub(r"\\\n\s*", " ", DOC.read_text())  # join shell continuation lines
    text = re.sub(r"[ \t]+", " ", text)
    assert " ".join(CPU_DDP_FLAGS) in text
    assert "torchrun --standalone --nproc_per_node 2 $(which fairseq-train)" in text
    assert "--nnodes 2 --node_rank" in text and "--master_addr" in text


def _guard():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_structattn_distributed_guard", USER_DIR / "distributed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check_data_parallel_launch


def test_launch_guard_names_the_fix_when_torchrun_ranks_would_train_alone():
    """``torchrun --nproc_per_node 2 fairseq-train … --cpu`` without the flags: fairseq stays single-process
    (distributed world size 1) while torchrun says WORLD_SIZE=2. The guard must refuse, naming the tested flags."""
    import torch.distributed as dist

    check = _guard()
    assert not dist.is_initialized()
    check({})  # plain single-process run
    check({"WORLD_SIZE": "1", "RANK": "0"})
    check({"WORLD_SIZE": "not-a-number"})
    with pytest.raises(RuntimeError) as err:
        check({"WORLD_SIZE": "2", "RANK": "1"})
    message = str(err.value)
    assert "rank 1 of WORLD_SIZE=2" in message
    assert " ".join(CPU_DDP_FLAGS) + " --distributed-world-size 2" in message
    assert "--distributed-world-size 2" in message.split("on CPU")[0]  # the GPU fix


@pytest.mark.slow
def test_naive_cpu_launch_fails_loudly_instead_of_training_alone(copy_data):
    """The launch a new user tries first (issue 8): without the flags, fairseq would start 2 independent runs.
    ``structattn_lstm`` refuses to build its model there, naming the fix."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fairseq_cli.train", "bin", *TRAIN_ARGS, "--cpu", "--distributed-backend", "gloo"],
        cwd=copy_data, env=_env(), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "WORLD_SIZE=2" in log and " ".join(CPU_DDP_FLAGS) in log, log[-3000:]
    assert "num_updates" not in log, "a rank started training alone"


@pytest.mark.slow
def test_two_cpu_ranks_resume_from_checkpoint_without_extra_flags(copy_data):
    """Rerunning the documented 2-rank command over an existing checkpoint_last.pt resumes: rank 0 loads the file
    and broadcasts the state (incl. the OmegaConf config) to rank 1 through torch.load — which needs the plugin's
    allow-list (structattn_fairseq/checkpoint_compat.py), not ``--load-checkpoint-on-all-dp-ranks``."""
    save = copy_data / "ddp-resume"
    common = [a for a in TRAIN_ARGS if a != "--no-save"] + ATTENTIONS["viterbi-entropy"] + [
        "--save-dir", str(save), "--no-epoch-checkpoints"]

    def launch(max_update):
        args = list(common)
        args[args.index("--max-update") + 1] = str(max_update)
        return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "-m", "fairseq_cli.train", "bin", *args, *CPU_DDP_FLAGS, "--distributed-world-size", "2"],
                    cwd=copy_data)

    launch(2)
    assert (save / "checkpoint_last.pt").exists()
    log = launch(4)
    assert re.search(r"loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 2 updates\)", log, re.I), log[-4000:]
    assert "num_updates 4" in log or re.search(r"num_updates\D+4\b", log), log[-4000:]
    assert "Unsupported global" not in log
