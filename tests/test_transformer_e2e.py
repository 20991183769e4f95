"""End-to-end: ``structattn_transformer`` through the real fairseq CLIs (preprocess → train → generate with beam
search, --print-alignment, --dump-attention of every head), on a learnable toy task (copy short random-token
sequences), CPU only. The model itself is tested in-process in test_transformer.py."""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from fairseq_helpers import (ROOT, USER_DIR, VARIANTS, cli_env, hypotheses, make_toy_data, parse_log, preprocess,
                             run_cli)

torch = pytest.importorskip("torch")
pytest.importorskip("fairseq")

pytestmark = pytest.mark.slow

MAX_UPDATE = 150
TINY = ["--arch", "structattn_transformer_tiny", "--dropout", "0"]
#: SparseMAP without the contiguity prior: with the default prior (τ = I, γ = 10) and the heads' O(1) scaled dot
#: products, every head starts on the two constant segmentations (2 structures per row, uniform weights, no
#: gradient to the scores) and did not learn the alignment in 150 updates (validation 1.36 bits, above the bound
#: below); with c = 0 it did (0.54 bits, 4.2 structures per row). docs/choosing_attention.md.
EXTRA = {"sparsemap": ["--attention-contiguity", "0"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_transformer")
    stats = make_toy_data(root / "raw", task="copy", n_train=600, n_valid=60, n_test=24)
    preprocess(root / "raw", root / "bin")
    return root, stats


@pytest.fixture(scope="module")
def trained(data):
    """The tiny Transformer trained once per attention with the real fairseq-train, two processes at a time (CI
    has 2 cores): {variant: (checkpoint_last.pt, fairseq-train stdout)}."""
    root, _ = data
    jobs = {}
    for name, variant_args in VARIANTS:
        save = root / f"ck-{name}"
        args = [root / "bin", "--user-dir", USER_DIR, *TINY, *variant_args, *EXTRA.get(name, []), "--optimizer",
                "adam", "--lr", "0.005",
                "--clip-norm", "1.0", "--batch-size", "32", "--max-update", str(MAX_UPDATE), "--save-dir", save,
                "--seed", "1", "--cpu", "--num-workers", "0", "--no-progress-bar", "--log-format", "json",
                "--log-interval", "10", "--no-epoch-checkpoints", "--criterion", "cross_entropy",
                "--validate-interval", "1000", "--validate-interval-updates", str(MAX_UPDATE)]
        jobs[name] = (save / "checkpoint_last.pt", [sys.executable, "-m", "fairseq_cli.train", *map(str, args)])
    out, running = {}, []
    for name, (checkpoint, cmd) in jobs.items():
        running.append((name, checkpoint, subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                                                           stderr=subprocess.PIPE, text=True)))
        if len(running) == 2 or name == list(jobs)[-1]:
            for n, ck, proc in running:
                stdout, stderr = proc.communicate(timeout=600)
                assert proc.returncode == 0, f"fairseq-train {n} exited {proc.returncode}\n{stderr[-4000:]}"
                out[n] = (ck, stdout)
            running = []
    return out


@pytest.mark.parametrize("name, variant_args", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_each_attention_learns_to_copy(data, trained, name, variant_args):
    _, stats = data
    _, stdout = trained[name]
    log = parse_log(stdout)
    valid = float(log["valid"][-1]["valid_loss"])
    first = float(log["train_inner"][0]["loss"])
    bound = stats["unigram_entropy_bits"]  # what a model that ignores the source can reach
    print(f"{name}: valid loss {valid} bits after {MAX_UPDATE} updates (first train {first}, bound {bound:.2f})")
    assert valid < 0.35 * bound and valid < first - 1.5, (name, valid, first, bound)
    assert int(log["train"][-1]["train_num_updates"]) == MAX_UPDATE
    if name.startswith("viterbi"):  # the Viterbi metrics, pooled over layers and heads
        record = log["valid"][-1]
        assert float(record["valid_attn_fallback"]) < 0.05 and "valid_T00/g" in record
    if name == "sparsemap":  # SparseMAP's: active structures per row, pooled over layers and heads
        record = log["valid"][-1]
        assert float(record["valid_attn_fallback"]) < 0.05 and float(record["valid_attn_structures"]) >= 1


def _load(root, checkpoint):
    from fairseq import checkpoint_utils, utils

    utils.import_user_module(argparse.Namespace(user_dir=str(USER_DIR)))
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)],
                                                                    arg_overrides={"data": str(root / "bin")})
    return models[0].eval(), task


def test_generate_with_beam_scores_hypotheses_as_a_forced_forward(data, trained):
    """fairseq-generate (beam 3, incremental decoding, 2-best) prints, for every hypothesis, the per-token scores
    that a non-incremental forward of the loaded checkpoint on (source, hypothesis) gives."""
    root, _ = data
    checkpoint, _ = trained["viterbi-l2"]
    gen = run_cli("generate", root / "bin", "--user-dir", USER_DIR, "--path", checkpoint, "--gen-subset", "test",
                  "--beam", "3", "--nbest", "2", "--batch-size", "8", "--cpu", "--max-len-a", "1", "--max-len-b", "3",
                  "--print-alignment")
    out = gen.stdout
    assert len(hypotheses(out)) == 24 and re.search(r"^A-\d+\t\d+-\d+", out, re.M), out[-2000:]
    model, task = _load(root, checkpoint)
    d = task.source_dictionary
    sources = {int(m.group(1)): m.group(2) for m in re.finditer(r"^S-(\d+)\t(.*)$", out, re.M)}
    lines = re.findall(r"^H-(\d+)\t(\S+)\t(.*)\nD-\d+\t\S+\t.*\nP-\d+\t(.*)$", out, re.M)
    assert len(lines) == 48
    for sid, score, text, positional in lines:
        src = d.encode_line(sources[int(sid)], add_if_not_exist=False).long()[None]
        tgt = task.target_dictionary.encode_line(text, add_if_not_exist=False).long()
        prev = torch.cat([tgt.new_tensor([d.eos()]), tgt[:-1]])[None]
        with torch.no_grad():
            lprobs = model.get_normalized_probs(model(src, torch.tensor([src.size(1)]), prev), log_probs=True)
        forced = lprobs[0].gather(1, tgt[:, None]).squeeze(1) / math.log(2)  # fairseq prints base 2
        printed = torch.tensor([float(x) for x in positional.split()])
        np.testing.assert_allclose(printed.numpy(), forced.numpy(), atol=2e-4, err_msg=f"sentence {sid}")
        assert abs(float(score) - float(forced.mean())) < 2e-4


def test_checkpoint_round_trip_under_weights_only_loading(data, trained):
    """The checkpoint loads with torch's weights-only unpickler (through the plugin's allow-list; the CLI helpers
    strip TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), and the loaded model holds exactly the saved parameters, the per-head
    transitions included."""
    from structattn_fairseq.checkpoint_compat import allow_fairseq_checkpoints

    root, _ = data
    checkpoint, _ = trained["viterbi-entropy"]
    with allow_fairseq_checkpoints():
        state = torch.load(checkpoint, weights_only=True)
    model, _ = _load(root, checkpoint)
    loaded = model.state_dict()
    assert set(loaded) == set(state["model"])
    assert all(torch.equal(loaded[k], state["model"][k]) for k in loaded)
    tau = [k for k in loaded if k.endswith("encoder_attn.normalizer.transitions_over_gamma")]
    assert len(tau) == 2 and loaded[tau[0]].shape == (4, 2, 2)


def test_dump_every_head_of_a_chosen_layer(data, trained, tmp_path, capsys):
    """--dump-attention-layer 0 --dump-attention-heads all: each record holds the 4 heads of layer 0 (mean =
    ``attention``), as the model computes them on the sentence alone; structattn-stats shows each head."""
    from structattn.export import read_dump
    from structattn.report.cli import stats_main

    root, _ = data
    checkpoint, _ = trained["viterbi-l2"]
    dump = tmp_path / "heads.jsonl"
    run_cli("generate", root / "bin", "--user-dir", USER_DIR, "--task", "structattn_translation", "--path",
            checkpoint, "--gen-subset", "test", "--beam", "3", "--batch-size", "8", "--cpu", "--max-len-a", "1",
            "--max-len-b", "3", "--required-batch-size-multiple", "1", "--dump-attention", dump,
            "--dump-attention-layer", "0", "--dump-attention-heads", "all")
    metadata, records = read_dump(dump)
    assert (metadata["attention_layer"], metadata["attention_heads"], metadata["num_heads"]) == (0, "all", 4)
    assert len(records) == 24 and metadata["summary"]["contract_ok"]
    model, task = _load(root, checkpoint)
    model.decoder.set_attention_export(layer=0, heads="all")
    sd, td = task.source_dictionary, task.target_dictionary
    for rec in records:
        assert rec.heads.shape == (4, *rec.attention.shape)
        np.testing.assert_allclose(rec.heads.mean(0), rec.attention, atol=1e-6)
        src = torch.tensor([[sd.index(t) for t in rec.src_tokens]])
        tgt = torch.tensor([td.index(t) for t in rec.tgt_tokens])
        prev = torch.cat([tgt.new_tensor([td.eos()]), tgt[:-1]])[None]
        with torch.no_grad():
            packed = model(src, torch.tensor([src.size(1)]), prev)[1]["attn"][0][0]  # (tgt, heads·src)
        heads = packed.view(len(tgt), 4, src.size(1)).transpose(0, 1).numpy()
        np.testing.assert_allclose(rec.heads, heads, atol=2e-5, err_msg=f"sentence {rec.id}")
    assert np.mean([(r.heads == 0).mean() for r in records]) > 0.05, "l2 heads have exact zeros"
    assert stats_main([f"l2={dump}"]) == 0
    table = capsys.readouterr().out
    assert all(f"l2/h{h} " in table for h in range(4)), table


def test_dump_option_errors(data, trained, tmp_path):
    """Bad --dump-attention-layer/-heads values stop fairseq-generate with one clear message (checked in-process:
    the task's build_generator runs before any batch is generated; an unknown --dump-attention-heads is refused by
    argparse)."""
    import contextlib
    import io

    from fairseq import options, tasks

    root, _ = data
    checkpoint, _ = trained["viterbi-l2"]
    model, _ = _load(root, checkpoint)

    def parse(*extra):
        parser = options.get_generation_parser(default_task="structattn_translation")
        return options.parse_args_and_arch(parser, [str(root / "bin"), "--user-dir", str(USER_DIR), "--task",
                                                    "structattn_translation", "--path", str(checkpoint), "--cpu",
                                                    *map(str, extra)])

    for extra, message in (
        (["--dump-attention", tmp_path / "a.jsonl", "--dump-attention-layer", "2"], "the decoder has 2 layers"),
        (["--dump-attention", tmp_path / "b.jsonl", "--dump-attention-heads", "all", "--print-alignment"],
         "cannot be combined with --print-alignment"),
    ):
        args = parse(*extra)
        with pytest.raises(ValueError, match=message):
            tasks.setup_task(args).build_generator([model], args)
    args = parse("--dump-attention", tmp_path / "d.jsonl", "--dump-attention-heads", "all")
    args.dump_attention = None  # programmatic use, past the command-line check: the task refuses it too
    with pytest.raises(ValueError, match="give --dump-attention PATH too"):
        tasks.setup_task(args).build_generator([model], args)
    # Caught on the command line already (structattn_fairseq/cli_checks.py; the task repeats the check for programmatic use):
    # one line, exit status 2, as argparse does for an unknown --dump-attention-heads.
    for extra, message in (
        (["--dump-attention-heads", "all"], "give --dump-attention PATH too"),
        (["--dump-attention", tmp_path / "c.jsonl", "--dump-attention-heads", "max"],
         "argument --dump-attention-heads: invalid choice: 'max'"),
    ):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            parse(*extra)
        assert exit_info.value.code == 2
        assert message in err.getvalue().strip().splitlines()[-1]
    assert not list(tmp_path.iterdir()), "nothing written"
