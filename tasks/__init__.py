"""monolm's tasks layer (see DESIGN.md)."""
