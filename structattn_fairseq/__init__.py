"""fairseq plugin for structattn: load with ``--user-dir "$(structattn-user-dir)"`` (see docs/plugin.md).

fairseq imports a ``--user-dir`` folder by its base name, so the plugin is this top-level package of the wheel and
``structattn-user-dir`` prints its folder; in a clone, ``--user-dir user_dir`` loads it through a shim.

One import per feature; add a line to register more (tasks, criteria, ...).
"""

from . import fairseq_patches

fairseq_patches.install()  # every deliberate change to fairseq's behaviour, documented in that module

from . import checkpoint_compat  # noqa: F401  (torch.load allow-list for fairseq checkpoints, torch >= 2.6)
from . import structattn_lstm  # noqa: F401  (model `structattn_lstm` and its architectures)
from . import structattn_transformer  # noqa: F401  (model `structattn_transformer` and its architectures)
from . import dump_task  # noqa: F401  (task `structattn_translation`: --dump-attention for fairseq-generate)
