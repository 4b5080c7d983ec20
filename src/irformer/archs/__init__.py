"""Image-restoration Transformers with pluggable norms, and the one door to them.

``build_model(name, **overrides)`` builds a preset or an architecture;
``load_checkpoint_model(path)`` rebuilds and loads official or irformer weights;
``save_model_weights(path, model)`` writes weights with the metadata that keeps
an i-LN checkpoint from ever being loaded as LayerNorm.
"""

from irformer.archs.registry import (
    ArchSpec,
    CheckpointMismatchError,
    Detection,
    build_model,
    count_parameters,
    describe_checkpoint,
    detect_architecture,
    list_archs,
    list_presets,
    load_checkpoint_model,
    load_state_into,
    load_weights,
    model_meta,
    preset_kwargs,
    read_state_dict,
    save_model_weights,
)

__all__ = [
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
    "save_model_weights",
]
