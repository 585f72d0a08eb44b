"""Pre-training of Megatron-core BERT, GPT-2 and T5 with our optimizers or the paper's baselines.

``config`` (schema, composition, overrides, validation), ``data`` and ``batches`` (indexed dataset
and per-model batches), ``models`` (megatron-core models and losses), ``backends`` (FSDP2, FSDP1,
DeepSpeed), ``checkpoint``, ``report`` and ``loop`` (the run). Entry points: :mod:`.run` (the
launcher), :mod:`.pretrain` (one rank) and :mod:`.build_dataset`.
"""
