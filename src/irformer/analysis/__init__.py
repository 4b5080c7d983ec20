"""Training-dynamics analysis: feature probes, their figures, and controlled studies.

``probes`` measures per-block magnitude and channel entropy (i-LN paper Sec. 2.1,
Alg. 1), the final-norm bias alignment (Fig. 7) and RPE tables (Fig. 9);
``plots`` draws them; ``studies`` trains one config under several norms or
scales with the probes attached and writes one table.
"""

from irformer.analysis.probes import (
    BiasAlignment,
    BlockStats,
    FeatureProbe,
    channel_entropy,
    discover_blocks,
    final_norm_alignment,
    measure_blocks,
    read_feature_records,
    register_block_type,
    rpe_smoothness,
    rpe_tables,
)

__all__ = [
    "BiasAlignment",
    "BlockStats",
    "FeatureProbe",
    "channel_entropy",
    "discover_blocks",
    "final_norm_alignment",
    "measure_blocks",
    "read_feature_records",
    "register_block_type",
    "rpe_smoothness",
    "rpe_tables",
]
