"""Data: image readers, tar shards, synthetic non-semantic images, evaluation datasets."""
