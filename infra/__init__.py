"""monolm's infra layer (see DESIGN.md)."""
