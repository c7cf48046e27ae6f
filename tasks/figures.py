"""Stage 7's figures inside the report artifact, so the Prefect UI shows them next to the text.

The UI renders a markdown artifact's images, but it cannot load a file from the results folder:
the figures go in as `data:` URIs. To keep the artifact small (it is stored in the server's
database and sent to every browser that opens it), each figure is scaled to at most
`MAX_WIDTH_PX` pixels wide and reduced to a palette of `COLORS` colours, which line plots lose
nothing by (about 30 KB per figure instead of 90).
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

# The figures stage 7 writes, in the order the report discusses them, with their captions.
FIGURES: dict[str, str] = {
    "perplexity.png": "Held-out perplexity per model",
    "attacks.png": "Attack damage per arm (absolute loss increase)",
    "training.png": "Training curves",
}
MAX_WIDTH_PX = 1000
COLORS = 128


def small_png(path: Path, max_width: int = MAX_WIDTH_PX, colors: int = COLORS) -> bytes:
    """The PNG at `path`, at most `max_width` pixels wide and palette-reduced."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    rgb.thumbnail((max_width, max_width * 4), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(small_png(path)).decode("ascii")


def embed_figures(markdown: str, results_dir: str | Path) -> str:
    """`markdown` (report.md) with its images of stage 7's figures (`![caption](attacks.png)`)
    embedded; a figure present in `results_dir` that the text does not show is appended under
    "Figures". Images of files that do not exist are left as they are."""
    results_dir = Path(results_dir)
    shown: set[str] = set()

    def embed(match: re.Match[str]) -> str:
        name = match.group(2)
        path = results_dir / name
        if name not in FIGURES or not path.is_file():
            return match.group(0)
        shown.add(name)
        return f"![{match.group(1)}]({data_uri(path)})"

    out = re.sub(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)", embed, markdown)
    missing = [name for name in FIGURES if name not in shown and (results_dir / name).is_file()]
    if missing:
        out += "\n\n## Figures\n\n" + "\n".join(
            f"![{FIGURES[name]}]({data_uri(results_dir / name)})\n\n_{FIGURES[name]} (`{name}`)._\n" for name in missing
        )
    return out
