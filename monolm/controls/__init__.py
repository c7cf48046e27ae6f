"""Quality controls that tell "more robust" apart from "more damaged" (issue 23): the damage-matched arm
(`damage`, `stage`) and the quality ladder (`ladder`, `rungs`)."""
