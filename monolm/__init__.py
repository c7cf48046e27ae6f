"""monolm: does constraining a language model's feed-forward weights to be non-negative make it
harder to attack, and what does it cost? The science lives here, with no Prefect import."""

__version__ = "0.1.0"
