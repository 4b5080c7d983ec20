"""Training, evaluation and inference engine.

- :mod:`.config`: typed, frozen run configs loaded from YAML (strict keys).
- :mod:`.train`: the training loop (:func:`~irformer.engine.train.train`).
- :mod:`.data`: the deterministic training sample stream (exact resume, DDP).
- :mod:`.checkpoint`: atomic checkpoints, RNG states, weight export.
- :mod:`.distributed`: torchrun/DDP setup.
- :mod:`.evaluate`, :mod:`.infer`: benchmark evaluation and inference.

Submodules are imported on use; importing the package loads nothing heavy.
"""
