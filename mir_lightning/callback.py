"""Former location of :mod:`mir_lightning.adapters.lightning`, kept so that existing imports go on working.

The name is an alias: ``import mir_lightning.callback`` gives the very module :mod:`mir_lightning.adapters.lightning`.
"""

import sys

from mir_lightning.adapters import lightning as _module

sys.modules[__name__] = _module
