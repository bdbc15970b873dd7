"""Former location of :mod:`mir_lightning.models.transformers`, kept so that existing imports go on working.

The name is an alias: ``import mir_lightning.integrations.transformers`` gives the very module :mod:`mir_lightning.models.transformers`.
"""

import sys

from mir_lightning.models import transformers as _module

sys.modules[__name__] = _module
