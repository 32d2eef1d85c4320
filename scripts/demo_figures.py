"""Copy the Janus demo's figures into docs/images, where the README and docs/training.md show them.

    reca train recipes/janus/tiny_demo.yaml
    python scripts/demo_figures.py outputs/janus-tiny-demo

Each figure is stored as a palette PNG (at most 64 colours: the plots' lines and the tiny model's 32-px images need
no more) so that all four stay under 200 KB together.
"""

import argparse
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).parents[1]
FIGURES = {  # the demo's output file -> its name under docs/images
    "reconstructions.png": "janus_tiny_demo_reconstructions.png",
    "text_to_image_before_after.png": "janus_tiny_demo_text_to_image.png",
    "training_loss.png": "janus_tiny_demo_loss.png",
    "collapse_probe.png": "janus_tiny_demo_probe.png",
}
MAX_BYTES = 200_000
COLOURS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", default="outputs/janus-tiny-demo", help="the demo's output_dir")
    args = parser.parse_args()
    folder = Path(args.output_dir)
    missing = [name for name in FIGURES if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"{folder} has no {', '.join(missing)}: run `reca train recipes/janus/tiny_demo.yaml` first")
    total = 0
    for source, target in FIGURES.items():
        path = ROOT / "docs" / "images" / target
        image = Image.open(folder / source).convert("RGB")
        image.quantize(COLOURS, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        total += path.stat().st_size
        print(f"{path.relative_to(ROOT)}: {image.width}x{image.height}, {path.stat().st_size / 1000:.0f} KB")
    print(f"total {total / 1000:.0f} KB")
    if total > MAX_BYTES:
        raise SystemExit(f"the figures take {total / 1000:.0f} KB together; keep them under {MAX_BYTES / 1000:.0f} KB")


if __name__ == "__main__":
    main()
