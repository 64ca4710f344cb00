# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""`vgr_charts`: real charts drawn with matplotlib from known values, and a question about one value of each,
scored with ChartQA's relaxed accuracy (a number within 5% of the true value).

Bar and line charts at sizes from 300 x 300 to 1600 x 400 (4:1 wide) and 400 x 1200 (1:3 tall), each value printed
over its bar or point, as in many ChartQA charts: a model that finds the right bar and reads it can answer.
"""

import io
import random
from pathlib import Path

import PIL.Image

from ..metrics import relaxed_accuracy
from .local import write_task


NAME = "vgr_charts"
SEED = 4000
# (kind, width, height) in pixels
CHARTS = [
    ("bar", 640, 480), ("line", 640, 480),
    ("bar", 1600, 400), ("line", 1200, 300),  # wide
    ("bar", 400, 1200), ("line", 360, 1080),  # tall
    ("bar", 300, 300), ("line", 900, 900),
]
CATEGORIES = [["2017", "2018", "2019", "2020", "2021"], ["North", "South", "East", "West"],
              ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]]
QUESTION = "What is the value for {category} in the chart? Answer with a number."


def render_chart(kind: str, width: int, height: int, categories: list[str], values: list[float],
                 title: str) -> PIL.Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    figure = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    axes = figure.add_subplot(111)
    if kind == "bar":
        bars = axes.bar(categories, values, color="tab:blue")
        axes.bar_label(bars, labels=[f"{value:g}" for value in values])
    else:
        axes.plot(categories, values, marker="o", color="tab:red")
        for category, value in zip(categories, values):
            axes.annotate(f"{value:g}", (category, value), textcoords="offset points", xytext=(0, 6), ha="center")
    axes.set_ylim(0, max(values) * 1.2)
    axes.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    buffer.seek(0)
    return PIL.Image.open(buffer).convert("RGB")


def make_charts(seed: int = SEED) -> tuple[list[dict], list[PIL.Image.Image]]:
    rng = random.Random(seed)
    rows, images = [], []
    for index, (kind, width, height) in enumerate(CHARTS):
        categories = rng.choice(CATEGORIES)
        values = [round(rng.uniform(5, 95), 1) for _ in categories]
        asked = rng.randrange(len(categories))
        images.append(render_chart(kind, width, height, categories, values, f"Chart {index + 1}"))
        rows.append({"id": f"chart-{index:02d}", "kind": kind, "width": width, "height": height,
                     "question": QUESTION.format(category=categories[asked]), "answer": f"{values[asked]:g}"})
    return rows, images


def write_chart_task(folder: Path) -> Path:
    rows, images = make_charts()
    return write_task(folder, NAME, rows, images, description="bar and line charts rendered from known values",
                      process_results=f"{__name__}.process_results", metric="relaxed_accuracy", max_new_tokens=48)


def process_results(doc: dict, results: list[str]) -> dict:
    return {"relaxed_accuracy": relaxed_accuracy(results[0], doc["answer"])}
