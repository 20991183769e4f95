"""Text processing steps of the recipes (stdin → stdout filters plus sentencepiece training).

* ``tok``:        Moses punctuation normalisation + Moses tokenisation (sacremoses, no HTML escaping).
* ``spm-train``:  a joint sentencepiece model trained on the *training* files only.
* ``spm-encode``: tokenised text → subword pieces.
* ``detok``:      pieces → sentencepiece decode → Moses detokenisation (the text that BLEU is computed on);
                  ``--expected N`` checks the number of lines (OpenNMT-py's translations: one per test line).
* ``hyp``:        extract hypotheses from ``fairseq-generate`` output in input order (``H-<id>`` lines).

The ``sentencepiece`` wheel has no ``spm_*`` executables, hence this small wrapper.
"""
from __future__ import annotations

import argparse
import re
import sys


def _lines(stream):
    for line in stream:
        yield line.rstrip("\n")


def moses_tokenize(lines, lang: str):
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    norm, tok = MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)
    for line in lines:
        yield tok.tokenize(norm.normalize(line), escape=False, return_str=True)


def moses_detokenize(lines, lang: str):
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    for line in lines:
        yield detok.detokenize(line.split())


def spm_train(inputs, model_prefix: str, vocab_size: int, character_coverage: float = 1.0,
              max_sentences: int = 2_000_000, seed: int = 1) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=",".join(inputs), model_prefix=model_prefix, vocab_size=vocab_size, model_type="unigram",
        character_coverage=character_coverage, input_sentence_size=max_sentences, shuffle_input_sentence=True,
        seed_sentencepiece_size=1_000_000, hard_vocab_limit=False,
        # fairseq builds its own dictionary: no special pieces needed in the encoded text.
        bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2, num_threads=1)


def spm_encode(lines, model: str):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    for line in lines:
        yield " ".join(sp.encode(line, out_type=str))


def spm_decode(lines, model: str):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    for line in lines:
        yield sp.decode(line.split())


_HYP = re.compile(r"^H-(\d+)\t[^\t]*\t(.*)$")


def generate_hypotheses(lines, expected: int | None = None):
    """``fairseq-generate`` prints hypotheses in completion order; restore the input order from ``H-<id>``."""
    hyps = {}
    for line in lines:
        m = _HYP.match(line)
        if m:
            hyps[int(m.group(1))] = m.group(2)
    n = expected if expected is not None else (max(hyps) + 1 if hyps else 0)
    missing = [i for i in range(n) if i not in hyps]
    if missing:
        raise ValueError(f"fairseq-generate output lacks {len(missing)} of {n} hypotheses (first id {missing[0]})")
    return [hyps[i] for i in range(n)]


def filter_pairs(src_lines, tgt_lines, max_len: int):
    """Pairs whose source and target both have 1..max_len whitespace tokens, in order, and the number dropped.
    The two sides must have the same number of lines (a parallel corpus): a mismatch is an error, not a silent
    truncation."""
    kept, dropped = [], 0
    src_lines, tgt_lines = list(src_lines), list(tgt_lines)
    if len(src_lines) != len(tgt_lines):
        raise ValueError(f"parallel files differ in length: {len(src_lines)} source vs {len(tgt_lines)} target lines")
    for s, t in zip(src_lines, tgt_lines):
        if 0 < len(s.split()) <= max_len and 0 < len(t.split()) <= max_len:
            kept.append((s, t))
        else:
            dropped += 1
    return kept, dropped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tok", help="Moses-normalise and tokenise stdin")
    t.add_argument("--lang", required=True)
    d = sub.add_parser("detok", help="sentencepiece-decode then Moses-detokenise stdin")
    d.add_argument("--lang", required=True)
    d.add_argument("--model", help="sentencepiece model (omit when the input is not subword-encoded)")
    d.add_argument("--expected", type=int,
                   help="number of input lines (one hypothesis per test sentence; another count is an error)")
    tr = sub.add_parser("spm-train", help="train a joint sentencepiece model")
    tr.add_argument("--input", nargs="+", required=True)
    tr.add_argument("--model-prefix", required=True)
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--character-coverage", type=float, default=1.0)
    e = sub.add_parser("spm-encode", help="encode stdin into sentencepiece pieces")
    e.add_argument("--model", required=True)
    h = sub.add_parser("hyp", help="hypotheses of fairseq-generate output (stdin), in input order")
    h.add_argument("--expected", type=int, help="number of input sentences (missing ones are an error)")
    f = sub.add_parser("filter-len", help="keep the pairs of SRC/TGT with at most --max-len tokens on both sides")
    f.add_argument("src")
    f.add_argument("tgt")
    f.add_argument("--max-len", type=int, required=True)
    f.add_argument("--out-src", required=True)
    f.add_argument("--out-tgt", required=True)
    args = p.parse_args(argv)
    if args.cmd == "filter-len":
        if args.max_len < 1:
            p.error("--max-len must be >= 1")
        with open(args.src, encoding="utf-8") as fs, open(args.tgt, encoding="utf-8") as ft:
            kept, dropped = filter_pairs(_lines(fs), _lines(ft), args.max_len)
        if not kept:
            p.error(f"no pair of {args.src}/{args.tgt} has at most {args.max_len} tokens on both sides")
        for path, side in ((args.out_src, 0), (args.out_tgt, 1)):
            with open(path, "w", encoding="utf-8") as out:
                out.writelines(pair[side] + "\n" for pair in kept)
        print(f"filter-len: kept {len(kept)} pairs, dropped {dropped} longer than {args.max_len} tokens",
              file=sys.stderr)
        return 0

    out = sys.stdout
    lines = _lines(sys.stdin)
    if args.cmd == "tok":
        it = moses_tokenize(lines, args.lang)
    elif args.cmd == "detok":
        if args.expected is not None:  # read all first: a short file writes nothing
            lines = list(lines)
            if len(lines) != args.expected:
                p.error(f"detok: {len(lines)} input lines, expected {args.expected} (one per test sentence)")
        it = moses_detokenize(spm_decode(lines, args.model) if args.model else lines, args.lang)
    elif args.cmd == "spm-encode":
        it = spm_encode(lines, args.model)
    elif args.cmd == "hyp":
        it = generate_hypotheses(lines, args.expected)
    else:
        if args.vocab_size < 8:
            p.error("--vocab-size must be >= 8")
        spm_train(args.input, args.model_prefix, args.vocab_size, args.character_coverage)
        return 0
    for line in it:
        out.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
