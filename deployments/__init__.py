"""monolm's deployments layer (see DESIGN.md)."""
