"""Starter scripts for the New job page's editor.

Each one runs on the jobcloud/ml image as it is; the page offers them by
name and submits them like any pasted code.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Template:
    key: str
    title: str
    file: str
    image: str
    dataset: str  # what to upload, for the page's hint; "" when none is needed

    def code(self) -> str:
        return resources.files(__package__).joinpath(self.file).read_text(encoding="utf-8")


TEMPLATES = (
    Template("pytorch", "PyTorch: train a network on a synthetic dataset", "pytorch_train.py",
             "jobcloud/ml", ""),
    Template("sklearn", "scikit-learn: fit a model to an uploaded CSV", "sklearn_csv.py",
             "jobcloud/ml", "a .zip holding one .csv file (the last column is the target)"),
    Template("opencv", "OpenCV: process the images of an uploaded zip", "opencv_images.py",
             "jobcloud/ml", "a .zip of .png or .jpg images"),
)


def load(images: tuple[str, ...]) -> list[dict]:
    """The templates with their code, for the page: those whose image is one of
    `images` (the proxy's setting), since choosing one also picks its image."""
    return [{"key": t.key, "title": t.title, "image": t.image, "dataset": t.dataset,
             "code": t.code()} for t in TEMPLATES if t.image in images]
