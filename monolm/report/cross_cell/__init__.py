"""The cross-cell report of a grid: statistics across variants, their words, figures and stage 7 of a grid."""
