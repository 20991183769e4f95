"""The plugin's torch.load allow-list covers the state a data-parallel resume broadcasts from rank 0 (the
OmegaConf config inside it), with torch's default weights_only=True loader and nothing unsafe switched on; it is
in force only inside fairseq's checkpoint loaders (or ``allow_fairseq_checkpoints()``), not for the whole process."""

import io
import subprocess
import sys
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import io, sys, torch
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
parser = options.get_training_parser()
args = options.parse_args_and_arch(parser, ['/tmp', '--arch', 'lstm', '--task', 'translation'])
state = {'cfg': convert_namespace_to_omegaconf(args), 'model': {'w': torch.ones(2)}}
buf = io.BytesIO(); torch.save(state, buf)
import contextlib
import structattn_fairseq  # loading the plugin must not widen torch.load for the whole process
scope = contextlib.nullcontext()
if sys.argv[1] == 'plugin':
    scope = structattn_fairseq.checkpoint_compat.allow_fairseq_checkpoints()
try:
    with scope:
        out = torch.load(io.BytesIO(buf.getvalue()), map_location='cpu')
except Exception as exc:
    print('REFUSED', type(exc).__name__)
else:
    assert out['cfg'].model.arch == 'lstm' and torch.equal(out['model']['w'], torch.ones(2))
    print('LOADED')
"""


def _run(mode):
    env = {k: v for k, v in __import__("os").environ.items() if "WEIGHTS_ONLY" not in k}
    res = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def test_broadcast_state_loads_only_with_plugin():
    assert _run("plain") == "REFUSED UnpicklingError"  # even with the plugin imported: no process-wide widening
    assert _run("plugin") == "LOADED"


def test_fairseq_checkpoint_loaders_run_inside_the_allow_list():
    """Loading the plugin wraps exactly fairseq's checkpoint loaders (structattn_fairseq/fairseq_patches.py)."""
    import importlib

    sys.path.insert(0, str(ROOT))
    import structattn_fairseq  # noqa: F401
    from structattn_fairseq.fairseq_patches import CHECKPOINT_LOADERS

    for module_name, name in CHECKPOINT_LOADERS:
        fn = getattr(importlib.import_module(module_name), name)
        assert getattr(fn, "_structattn_allow_list", False), (module_name, name)
        assert fn.__wrapped__.__module__ == module_name  # the original, wrapped once


FIXTURE = ROOT / "tests" / "fixtures" / "pre_package_checkpoint"

LEGACY = r"""
import sys, torch
from fairseq import checkpoint_utils, utils
utils.import_user_module(type("A", (), {"user_dir": sys.argv[1]})())
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([sys.argv[2] + "/checkpoint_best.pt"],
                                                                 arg_overrides={"data": sys.argv[2] + "/bin"})
model = models[0].eval()
print(cfg.model.arch, cfg.common.user_dir.rstrip("/").split("/")[-1], type(model).__module__)
d = task.source_dictionary
src = torch.tensor([[d.index(w) for w in "w0 w0 w5 w4".split()] + [d.eos()]])
prev = torch.tensor([[d.eos()] + [d.index(w) for w in "w0 w0 w5 w4".split()]])
out, attn = model(src, torch.tensor([5]), prev)
print(tuple(out.shape), bool(torch.isfinite(out).all()), float(attn.sum(-1).min()))
"""


def test_checkpoint_written_before_the_package_loads():
    """A checkpoint written by fairseq-train with the plugin as it was before it became the package
    structattn_fairseq (``--user-dir .../user_dir``, commit 6e07f06; tests/fixtures/pre_package_checkpoint/README.md)
    loads with the package, and through the clone's user_dir/ shim, and runs: it stores only the architecture name
    and an argparse.Namespace, no module path of the plugin."""
    for user_dir in (ROOT / "structattn_fairseq", ROOT / "user_dir"):
        r = subprocess.run([sys.executable, "-c", LEGACY, str(user_dir), str(FIXTURE)], capture_output=True,
                           text=True, timeout=600, cwd="/", env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr[-3000:]
        names, shape = r.stdout.splitlines()[-2:]
        assert names == "structattn_lstm user_dir structattn_fairseq.structattn_lstm", names
        out_shape, finite, row_sum = shape.rsplit(" ", 2)[0], shape.split()[-2], float(shape.split()[-1])
        assert out_shape == "(1, 5, 16)" and finite == "True" and abs(row_sum - 1) < 1e-5, shape
