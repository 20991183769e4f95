"""The plugin's torch.load allow-list covers the state a data-parallel resume broadcasts from rank 0 (the
OmegaConf config inside it), with torch's default weights_only=True loader and nothing unsafe switched on."""

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
if sys.argv[1] == 'plugin':
    import user_dir.checkpoint_compat  # noqa: F401
try:
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
    assert _run("plain") == "REFUSED UnpicklingError"
    assert _run("plugin") == "LOADED"
