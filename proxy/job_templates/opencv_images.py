"""Process the images of a .zip you upload with OpenCV.

Dataset: a .zip of images (.png, .jpg, .jpeg, .bmp, .tif). For each one this
writes its edge map (Canny) and a thumbnail to the outputs, and a summary.csv
with its size, mean brightness and share of edge pixels.
"""
import csv
import os
from pathlib import Path

import cv2

DATA = Path(os.environ.get("JOBCLOUD_DATA", "data"))
OUTPUT = Path(os.environ.get("JOBCLOUD_OUTPUT", "."))
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}

images = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in SUFFIXES)
if not images:
    raise SystemExit(f"no images in the dataset ({DATA}): upload a .zip of .png/.jpg files")
(OUTPUT / "edges").mkdir(exist_ok=True)
(OUTPUT / "thumbnails").mkdir(exist_ok=True)

rows = []
for path in images:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        print(f"skipped {path.name}: not an image OpenCV can read")
        continue
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    edges = cv2.Canny(cv2.GaussianBlur(gray, (5, 5), 0), 50, 150)
    height, width = gray.shape
    scale = 128 / max(height, width)
    thumbnail = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                           interpolation=cv2.INTER_AREA)
    name = path.relative_to(DATA).with_suffix(".png").as_posix().replace("/", "_")
    cv2.imwrite(str(OUTPUT / "edges" / name), edges)
    cv2.imwrite(str(OUTPUT / "thumbnails" / name), thumbnail)
    edge_share = float((edges > 0).mean())
    rows.append({"image": path.relative_to(DATA).as_posix(), "width": width, "height": height,
                 "mean_brightness": round(float(gray.mean()), 2), "edge_share": round(edge_share, 4)})
    print(f"{path.name}: {width}x{height}, edges {edge_share:.1%}", flush=True)

with open(OUTPUT / "summary.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["image", "width", "height", "mean_brightness", "edge_share"])
    writer.writeheader()
    writer.writerows(rows)
print(f"processed {len(rows)} of {len(images)} images")
