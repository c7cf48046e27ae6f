"""The constraint: the softplus reparametrization, its function drift and monotonicity measurements, and stage 1."""
