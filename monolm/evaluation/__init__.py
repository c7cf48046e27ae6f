"""Evaluation: lm-eval-compatible perplexity and stage 4."""
