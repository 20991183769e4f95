"""The README's Python examples run as written."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


OWN_MODEL = "## Use it in your own model"


def _python_blocks() -> list[tuple[str, str]]:
    """(section heading, code) of every ```python block of the README."""
    out, heading = [], None
    for part in re.split(r"(^## .*$)", (ROOT / "README.md").read_text(), flags=re.M):
        if part.startswith("## "):
            heading = part.strip()
            continue
        out.extend((heading, code) for code in re.findall(r"```python\n(.*?)```", part, flags=re.S))
    return out


def test_readme_python_blocks_run():
    blocks = [code for heading, code in _python_blocks() if heading != OWN_MODEL]  # that one: the test below
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_own_model_example_trains():
    """The "use it in your own model" module runs as written, learns its task, and its attention is a proper
    distribution over the real tokens of every padded sentence."""
    import torch

    from structattn.attention import ViterbiAttention
    from structattn.options import DEFAULT_FORM, PAPER_GAMMA

    blocks = [code for heading, code in _python_blocks() if heading == OWN_MODEL]
    assert len(blocks) == 1, "the README's own-model section must hold one python block"
    assert "ViterbiAttention" in blocks[0] and "backward()" in blocks[0] and "optimizer.step()" in blocks[0]
    ns = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    model, tokens, labels = ns["model"], ns["tokens"], ns["labels"]
    att = next(m for m in model.modules() if isinstance(m, ViterbiAttention))
    assert att.form == DEFAULT_FORM and att.gamma == PAPER_GAMMA[att.reg]
    assert labels.float().mean().item() > 0.2 and labels.float().mean().item() < 0.8  # a task, not a constant
    with torch.no_grad():
        logits, weights = model(tokens)
    assert (logits.argmax(1) == labels).float().mean().item() > 0.95
    assert ns["loss"].item() < 0.1
    pad = tokens.eq(0)
    assert pad.any() and (weights[pad] == 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(len(tokens)))


def test_readme_distributed_section_shows_the_tested_cpu_command():
    from test_distributed import CPU_DDP_FLAGS  # the flags tests/test_distributed.py really runs

    text = (ROOT / "README.md").read_text()
    assert "## Training on several GPUs or machines" in text
    flat = re.sub(r"[ \t]+", " ", re.sub(r"\\\n\s*", " ", text))
    assert "torchrun --standalone --nproc_per_node 2 $(which fairseq-train)" in flat
    assert " ".join(CPU_DDP_FLAGS) + " --distributed-world-size 2" in flat


def test_readme_structattn_names_exist():
    """Every `structattn.…` name the README mentions imports (e.g. `structattn.set_default_backend`, exported at
    the top level), and the top level's __all__ lists what it exports."""
    import importlib

    import structattn

    names = set(re.findall(r"`(structattn(?:\.\w+)+)", (ROOT / "README.md").read_text()))
    assert "structattn.set_default_backend" in names
    for name in sorted(names):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), name
            obj = getattr(obj, attr)
    for name in structattn.__all__:
        assert hasattr(structattn, name), name
    assert {"set_default_backend", "get_default_backend", "viterbi_backend"} <= set(structattn.__all__)
