"""Data pipelines: TFDS/RLDS ingestion, primitive-clip datasets and Grain input pipelines."""
