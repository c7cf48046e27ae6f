"""monolm's flows layer (see DESIGN.md)."""
