"""The project's plumbing: atomic checksummed files, provenance, runtime (device, threads, bf16), logs, progress."""
