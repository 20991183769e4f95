"""The README's Python examples run as written."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_distributed_section_shows_the_tested_cpu_command():
    from test_distributed import CPU_DDP_FLAGS  # the flags tests/test_distributed.py really runs

    text = (ROOT / "README.md").read_text()
    assert "## Training on several GPUs or machines" in text
    flat = re.sub(r"[ \t]+", " ", re.sub(r"\\\n\s*", " ", text))
    assert "torchrun --standalone --nproc_per_node 2 $(which fairseq-train)" in flat
    assert " ".join(CPU_DDP_FLAGS) + " --distributed-world-size 2" in flat
