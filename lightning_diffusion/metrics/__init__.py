"""Sample-quality metrics through torch-fidelity (FID / IS / KID / precision-recall), reference statistics and the
protocol record (`fidelity`), the offline digits feature extractor (`domain`), and DDP sharding (`sharding`)."""

from .fidelity import (BACKEND, INCEPTION, METRICS, Extractor, ReferenceStatistics, extract_features, fidelity_images,
                       fidelity_metrics, load_extractor, metric_names, protocol_record, reference_statistics,
                       resolve_weights, summarize_seed_sets)
from .sharding import gather_shards, generate_shard

__all__ = ["BACKEND", "INCEPTION", "METRICS", "Extractor", "ReferenceStatistics", "extract_features",
           "fidelity_images", "fidelity_metrics", "gather_shards", "generate_shard", "load_extractor", "metric_names",
           "protocol_record", "reference_statistics", "resolve_weights", "summarize_seed_sets"]
