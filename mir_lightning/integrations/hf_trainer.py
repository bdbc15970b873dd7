"""Former location of :mod:`mir_lightning.adapters.hf_trainer`, kept so that existing imports go on working.

The name is an alias: ``import mir_lightning.integrations.hf_trainer`` gives the very module :mod:`mir_lightning.adapters.hf_trainer`.
"""

import sys

from mir_lightning.adapters import hf_trainer as _module

sys.modules[__name__] = _module
