"""Quality controls: untrained arms that tell "more robust" apart from "more damaged" (issue 23)."""
