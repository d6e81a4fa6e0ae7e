"""Pretraining data: shards on disk or object storage (`shards`), packing and the per-slot streams."""
