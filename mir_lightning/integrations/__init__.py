"""Former home of model introspection and the HF Trainer adapter (kept for old imports).

Model introspection now lives in :mod:`mir_lightning.models`, trainer adapters in
:mod:`mir_lightning.adapters`; ``mir_lightning.integrations.transformers``, ``.llava`` and
``.hf_trainer`` are aliases of those modules.
"""
