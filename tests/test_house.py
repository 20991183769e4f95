"""The house rules of docs/architecture.md that a grep can check: fairseq is patched from one module, and the
facts that used to be written in several places (the paper's γ, the variant list) are written once."""

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked(*patterns) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in out.stdout.split()]


def _fairseq_names(tree: ast.Module) -> set[str]:
    """Local names bound to fairseq modules or objects by the imports of a module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "fairseq"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fairseq":
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node):
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _patch_sites(path: Path) -> list[int]:
    """Lines that assign an attribute of something imported from fairseq (``fairseq.options.x = ...``,
    ``setattr(fairseq_module, ...)``)."""
    tree = ast.parse(path.read_text())
    names = _fairseq_names(tree)
    lines = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
        for t in targets:
            if isinstance(t, ast.Attribute) and _root(t) in names:
                lines.append(node.lineno)
    return lines


def test_fairseq_is_patched_only_from_fairseq_patches():
    sites = {p.relative_to(ROOT).as_posix(): _patch_sites(p)
             for p in _tracked("structattn_fairseq/*.py", "structattn/*.py", "structattn/**/*.py")}
    assert sites["structattn_fairseq/fairseq_patches.py"], "the scan no longer sees the patches it must allow"
    elsewhere = {p: lines for p, lines in sites.items() if lines and p != "structattn_fairseq/fairseq_patches.py"}
    assert not elsewhere, f"fairseq patched outside structattn_fairseq/fairseq_patches.py: {elsewhere}"


def _code_lines(pattern: str):
    rx = re.compile(pattern)
    for path in _tracked("*.py", "*.sh"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("tests/"):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if rx.search(line.split("#")[0] if path.suffix == ".sh" else line):
                yield f"{rel}:{i}"


def test_paper_gamma_is_defined_once():
    hits = list(_code_lines(r'\{\s*"entropy"\s*:\s*2(\.0)?\s*,\s*"l2"\s*:\s*10(\.0)?\s*\}|(^|\s)gamma_ent(ropy)?=2\b|(^|\s)gamma_l2=10\b'))
    assert [h.split(":")[0] for h in hits] == ["structattn/options.py"], hits


def test_variant_list_is_written_once():
    hits = [h for h in _code_lines(r"softmax[ |]sparsemax[ |]viterbi-entropy[ |]viterbi-l2")
            if not h.startswith("structattn/evaluation/variants.py")]
    assert not hits, f"the variant list is written outside structattn/evaluation/variants.py: {hits}"
