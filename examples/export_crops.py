"""Export demo crops: real kmnist-dev *test* images (never seen by the default model in training) as PNG
files, half as in KMNIST (light ink on dark), half as a scan would be (dark ink on light paper).

    .venv/bin/python examples/export_crops.py   # rewrites examples/crops/ and examples/labels.csv
"""

from pathlib import Path

from PIL import Image

from kmnist_core.datasets import load_dataset

PER_POLARITY = 150
HERE = Path(__file__).parent


def main() -> None:
    data = load_dataset("kmnist-dev")
    rows = ["rel_path,char,codepoint"]
    for i in range(2 * PER_POLARITY):
        image, label = data.test.images[i], int(data.test.labels[i])
        folder = "light-on-dark" if i < PER_POLARITY else "dark-on-light"
        pixels = image if folder == "light-on-dark" else 255 - image
        rel = f"{folder}/{i:04d}.png"
        (HERE / "crops" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(HERE / "crops" / rel)
        rows.append(f"{rel},{data.classes.chars[label]},{data.classes.codepoints[label]}")
    (HERE / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
