"""A study as a whole: its cells, folders and stage registry, the stage frame, the sequential
runner, the dry run, preflight and site checks."""
