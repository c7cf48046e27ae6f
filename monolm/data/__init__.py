"""Data: the four parts (train, validation, test, attack), the contamination check, and stage 0
(setup) that makes them."""
