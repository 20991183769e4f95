"""fairseq plugin for structattn: load with ``--user-dir user_dir`` (see docs/plugin.md).

One import per feature; add a line to register more (tasks, criteria, ...).
"""

from . import fairseq_patches

fairseq_patches.install()  # every deliberate change to fairseq's behaviour, documented in that module

from . import checkpoint_compat  # noqa: F401  (torch.load allow-list for fairseq checkpoints, torch >= 2.6)
from . import structattn_lstm  # noqa: F401  (model `structattn_lstm` and its architectures)
from . import structattn_transformer  # noqa: F401  (model `structattn_transformer` and its architectures)
from . import dump_task  # noqa: F401  (task `structattn_translation`: --dump-attention for fairseq-generate)
