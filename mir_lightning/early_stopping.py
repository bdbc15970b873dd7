"""Former location of :mod:`mir_lightning.adapters.early_stopping`, kept so that existing imports go on working.

The name is an alias: ``import mir_lightning.early_stopping`` gives the very module :mod:`mir_lightning.adapters.early_stopping`.
"""

import sys

from mir_lightning.adapters import early_stopping as _module

sys.modules[__name__] = _module
