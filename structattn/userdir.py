"""Console command ``structattn-user-dir``: print the folder of the fairseq plugin, to pass to ``--user-dir``::

    fairseq-train data-bin --user-dir "$(structattn-user-dir)" --arch structattn_lstm ...

The plugin is the top-level package ``structattn_fairseq`` of this wheel (fairseq imports a ``--user-dir`` folder
by its base name). The folder is found without importing the package, which imports fairseq: the command works,
and is quick, where fairseq is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

__all__ = ["plugin_dir", "main"]


def plugin_dir() -> str:
    """The absolute folder of the installed ``structattn_fairseq`` package."""
    spec = importlib.util.find_spec("structattn_fairseq")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the package structattn_fairseq is not installed (pip install structattn)")
    return os.path.realpath(list(spec.submodule_search_locations)[0])


def main(argv=None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="structattn-user-dir",
        description="Print the folder of structattn's fairseq plugin, for fairseq's --user-dir.")
    parser.add_argument("--version", action="version", version=f"structattn {__version__}")
    parser.parse_args(argv)
    try:
        print(plugin_dir())
    except ModuleNotFoundError as e:
        print(f"structattn-user-dir: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m structattn.userdir
    sys.exit(main())
