"""Evaluation: feature extractors, metrics over their features, reference statistics, and the
evaluation job of evaluate.py and of the training callback."""
