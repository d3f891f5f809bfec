"""Build docs/realsr_example.png: RealSR LR (nearest ×4) | the authors' OSEDiff output | HR, crops labelled.

Run from the repository root: `python docs/make_figure.py` (reads ../shared/benchmarks/realsr).
"""

from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "realsr"
NAMES = ["Canon_003_LR4.png", "Nikon_024_LR4.png"]
CROP = 256


def main() -> None:
    rows = []
    for name in NAMES:
        lr = Image.open(ROOT / "LR" / name).convert("RGB").resize((512, 512), Image.NEAREST)
        sr = Image.open(ROOT / "osediff" / name).convert("RGB")
        hr = Image.open(ROOT / "HR" / name).convert("RGB")
        box = (128, 128, 128 + CROP, 128 + CROP)
        rows.append([im.crop(box) for im in (lr, sr, hr)])
    label_h = 22
    fig = Image.new("RGB", (3 * CROP + 20, len(rows) * CROP + label_h + 10 * len(rows)), "white")
    draw = ImageDraw.Draw(fig)
    for j, text in enumerate(["LR (128 px, nearest x4)", "OSEDiff (authors' output)", "HR (ground truth)"]):
        draw.text((j * (CROP + 10) + 6, 4), text, fill="black")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            fig.paste(im, (j * (CROP + 10), label_h + i * (CROP + 10)))
    fig.save(Path(__file__).with_name("realsr_example.png"), optimize=True)


if __name__ == "__main__":
    main()
