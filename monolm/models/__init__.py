"""Models: hub loading and the tiny model, the catalogue of Pythia shapes, and a model's shape
known before any download."""
