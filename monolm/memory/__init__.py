"""Memory: estimates of a stage's peak and the plans (batch sizes) derived from them."""
