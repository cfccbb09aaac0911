"""Sample-quality metrics through torch-fidelity: extractors (`extractors`, the offline `digits_extractor`), reference
statistics (`reference`), FID / IS / KID / precision-recall with their protocol (`fidelity`); bits/dim
(`bits_per_dim`), a real-data classifier (`classifier`), and DDP sharding of samples (`sharding`)."""
