"""Former location of :mod:`mir_lightning.models.llava`, kept so that existing imports go on working.

The name is an alias: ``import mir_lightning.integrations.llava`` gives the very module :mod:`mir_lightning.models.llava`.
"""

import sys

from mir_lightning.models import llava as _module

sys.modules[__name__] = _module
