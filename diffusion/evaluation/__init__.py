"""Evaluation: the feature extractors (TF Inception-v3 of FID, DINOv2, CLIP) and the metrics computed on their features."""
