"""What a model looks like to MIR: its LLM layers, image tokens and masks.

Below the engine: nothing here knows a trainer, a probe or a logger.

* :mod:`mir_lightning.models.transformers` -- Hugging Face VLM / causal-LM families, wrapper
  unwrapping (DDP, DeepSpeed, FSDP, peft, ``torch.compile``), masks from input ids.
* :mod:`mir_lightning.models.llava` -- the original LLaVA codebase's spliced ``-200`` layout.
"""
