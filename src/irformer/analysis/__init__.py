"""Training-dynamics analysis: feature probes, their figures, and controlled studies.

``probes`` measures per-block magnitude (mean square) and two channel entropies
(i-LN paper Sec. 2.1, Alg. 1, and a scale-invariant balance entropy), the
final-norm bias alignment (Fig. 7) and RPE tables (Fig. 9); ``plots`` draws
them; ``readout`` turns end-of-training records into numbers and one sentence;
``studies`` trains one config under several norms or scales with the probes
attached and writes one table.
"""

from irformer.analysis.probes import (
    BiasAlignment,
    BlockStats,
    FeatureProbe,
    channel_balance_entropy,
    channel_entropy,
    discover_blocks,
    final_norm_alignment,
    measure_blocks,
    read_feature_records,
    register_block_type,
    rpe_smoothness,
    rpe_tables,
)
from irformer.analysis.readout import LayerReadout, entropy_contrast, layer_readout

__all__ = [
    "BiasAlignment",
    "BlockStats",
    "FeatureProbe",
    "LayerReadout",
    "channel_balance_entropy",
    "channel_entropy",
    "discover_blocks",
    "entropy_contrast",
    "final_norm_alignment",
    "layer_readout",
    "measure_blocks",
    "read_feature_records",
    "register_block_type",
    "rpe_smoothness",
    "rpe_tables",
]
