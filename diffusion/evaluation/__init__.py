"""Evaluation of generated samples: feature statistics and the metrics computed from them."""
