"""Controls that tell robustness apart from damage: the quality ladder (`ladder`, `rungs`)."""
