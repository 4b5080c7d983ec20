"""Image-restoration Transformers with pluggable norms, and the one door to them.

Layout: ``swinir``, ``hat``, ``drct``, ``srformer`` (one file per architecture:
its blocks, model class, presets, official state-dict detection); ``layers``
(what the four share: the restoration frame, MLP, patch (un)embedding, heads);
``windows`` (window geometry) and ``attention`` (how attention and MLP halves
execute); ``registry`` (the table of the four, ``build_model``),
``checkpoints`` (weights files) and ``zoo`` (what ``--model NAME`` means: a file, a
shipped model's name, a preset).

``build_model(name, **overrides)`` builds a preset or an architecture;
``load_checkpoint_model(path)`` rebuilds and loads official or irformer weights;
``save_model_weights(path, model)`` writes weights with the metadata that keeps
an i-LN checkpoint from ever being loaded as LayerNorm.
"""

from irformer.archs.checkpoints import (
    Detection,
    describe_checkpoint,
    detect_architecture,
    load_checkpoint_model,
    load_state_into,
    load_weights,
    read_state_dict,
    save_model_weights,
)
from irformer.archs.layers import residual_groups, transformer_blocks
from irformer.archs.registry import (
    ARCHITECTURES,
    build_model,
    count_parameters,
    list_archs,
    list_presets,
    model_meta,
    preset_kwargs,
)
from irformer.archs.spec import ArchSpec
from irformer.archs.state import SIZE_DEPENDENT_BUFFERS, CheckpointMismatchError

__all__ = [
    "ARCHITECTURES",
    "SIZE_DEPENDENT_BUFFERS",
    "ArchSpec",
    "CheckpointMismatchError",
    "Detection",
    "build_model",
    "count_parameters",
    "describe_checkpoint",
    "detect_architecture",
    "list_archs",
    "list_presets",
    "load_checkpoint_model",
    "load_state_into",
    "load_weights",
    "model_meta",
    "preset_kwargs",
    "read_state_dict",
    "residual_groups",
    "save_model_weights",
    "transformer_blocks",
]
