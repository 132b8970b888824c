"""A small, deterministic, COCO-shaped dataset so the demo and the tests run anywhere offline.

Each image shows one or two shapes of one colour on a plain background; its five captions name
colour, shape, count and background in varied wording. The attributes are coarse enough for a
tiny CLIP model at 64 px to learn them, and their combinations (8 x 4 x 2 x 5 = 320) many enough
that retrieval over 200 validation images means something.

Layout written under OUT (the same as COCO's, plus a zero-shot set and a manifest):

    train2017/000000000001.jpg ...      val2017/...
    annotations/captions_train2017.json annotations/captions_val2017.json
    zeroshot/<colour>_<shape>/*.jpg     zeroshot/classnames.txt  zeroshot/templates.txt
    demo_data.json                      (written last: its presence means the dataset is complete)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from acc_clip.errors import UsageError

MANIFEST_NAME = "demo_data.json"
# Bump when the images or captions change, so an old folder is not silently reused.
FORMAT_VERSION = 1

# canonical name -> (RGB, words a caption may use for it)
SHAPE_COLOURS: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "red": ((220, 30, 30), ["red", "crimson", "scarlet"]),
    "green": ((30, 165, 50), ["green", "emerald", "grass-green"]),
    "blue": ((35, 65, 225), ["blue", "cobalt", "royal-blue"]),
    "yellow": ((240, 215, 25), ["yellow", "lemon", "golden"]),
    "orange": ((245, 135, 20), ["orange", "tangerine", "amber"]),
    "purple": ((135, 40, 175), ["purple", "violet", "plum"]),
    "pink": ((250, 135, 195), ["pink", "rose", "bubblegum"]),
    "brown": ((120, 72, 30), ["brown", "chocolate", "coffee-coloured"]),
}
# Background words share no word with the shape colours, so a caption's colour is unambiguous.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "white": ((245, 245, 242), ["white", "snow-white", "chalk-white"]),
    "black": ((18, 18, 22), ["black", "jet-black", "dark"]),
    "gray": ((128, 128, 128), ["gray", "grey", "ash-gray"]),
    "sand": ((215, 190, 140), ["sandy", "beige", "tan"]),
    "teal": ((0, 120, 125), ["teal", "deep teal", "turquoise"]),
}
# canonical name -> (singular, plural) wordings
SHAPES: dict[str, list[tuple[str, str]]] = {
    "circle": [("circle", "circles"), ("round shape", "round shapes"), ("disc", "discs")],
    "square": [("square", "squares"), ("box", "boxes"), ("four-sided block", "four-sided blocks")],
    "triangle": [("triangle", "triangles"), ("three-sided shape", "three-sided shapes"), ("wedge", "wedges")],
    "star": [("star", "stars"), ("five-pointed star", "five-pointed stars"), ("star shape", "star shapes")],
}
COUNT_WORDS = {1: ["a", "one", "a single"], 2: ["two", "a pair of", "2"]}
CAPTION_TEMPLATES = [
    "{n} {c} {s} on a {b} background",
    "{n} {c} {s} over a {b} field",
    "a {b} backdrop with {n} {c} {s}",
    "{n} {s}, coloured {c}, against a {b} background",
    "there {be} {n} {c} {s} in front of a {b} backdrop",
    "a picture of {n} {c} {s} on {b}",
    "{n} {c} {s} drawn on a plain {b} canvas",
]
CAPTIONS_PER_IMAGE = 5
ZEROSHOT_TEMPLATES = [
    "a photo of a {}.",
    "a drawing of a {}.",
    "a picture of one {}.",
    "a {} on a plain background.",
    "a simple {}.",
]


class Scene(NamedTuple):
    colour: str
    shape: str
    count: int  # type: ignore[assignment]  # objects in the scene, not tuple.count
    background: str


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        colour=rng.choice(list(SHAPE_COLOURS)),
        shape=rng.choice(list(SHAPES)),
        count=rng.choice([1, 2]),
        background=rng.choice(list(BACKGROUNDS)),
    )


def scene_captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five captions, each from a different template with freshly drawn synonyms."""
    captions = []
    for template in rng.sample(CAPTION_TEMPLATES, CAPTIONS_PER_IMAGE):
        singular, plural = rng.choice(SHAPES[scene.shape])
        caption = template.format(
            n=rng.choice(COUNT_WORDS[scene.count]),
            c=rng.choice(SHAPE_COLOURS[scene.colour][1]),
            s=singular if scene.count == 1 else plural,
            b=rng.choice(BACKGROUNDS[scene.background][1]),
            be="is" if scene.count == 1 else "are",
        )
        captions.append(re.sub(r"\ba (?=[aeiou])", "an ", caption))
    return captions


def jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def star_points(cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = rotation + k * math.pi / 5 - math.pi / 2
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int],
    rng: random.Random,
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        # A small tilt only: a square turned 45 degrees would read as a diamond.
        draw.regular_polygon((cx, cy, r), 4, rotation=rng.uniform(-15, 15), fill=fill)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy, r), 3, rotation=rng.uniform(-15, 15), fill=fill)
    elif shape == "star":
        draw.polygon(star_points(cx, cy, r * 1.1, rng.uniform(0, 2 * math.pi / 5)), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Draw the scene with random position, size, tilt and colour jitter, plus mild pixel noise.

    Shapes stay inside the centred min(W, H) square, which a centre crop keeps."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    image = Image.new("RGB", size, jitter(BACKGROUNDS[scene.background][0], rng, 10))
    draw = ImageDraw.Draw(image)
    fill = jitter(SHAPE_COLOURS[scene.colour][0], rng, 12)
    if scene.count == 1:
        r = side * rng.uniform(0.18, 0.28)
        slots = [(left, left + side)]
    else:
        r = side * rng.uniform(0.12, 0.17)
        slots = [(left, left + side / 2), (left + side / 2, left + side)]
    for x0, x1 in slots:
        # Wider than the largest shape (a star reaches 1.1 r), so two shapes never touch.
        margin = r * 1.25
        cx = rng.uniform(x0 + margin, x1 - margin)
        cy = rng.uniform(top + margin, top + side - margin)
        draw_shape(draw, scene.shape, cx, cy, r, fill, rng)
    # Mild noise, vectorised: a low-resolution field upscaled, so it costs little per image.
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    field = noise_rng.normal(0.0, 6.0, (max(1, height // 4), max(1, width // 4), 3)).astype(np.float32)
    noise = (
        np.asarray(
            Image.fromarray(np.clip(field + 128, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR),
            dtype=np.int16,
        )
        - 128
    )
    pixels = np.asarray(image, dtype=np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save_jpeg(image: Image.Image, path: str, rng: random.Random) -> None:
    image.save(path, format="JPEG", quality=rng.randint(80, 95))


def image_rng(seed: int, split: str, index: int) -> random.Random:
    """Each image has its own stream, so the first k images do not depend on how many are made."""
    return random.Random(f"{seed}:{split}:{index}")


def write_split(out_dir: str, split: str, first_id: int, count: int, size: tuple[int, int], seed: int) -> str:
    """Write the images of one split and its captions JSON in COCO's schema; returns the JSON path."""
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = image_rng(seed, split, index)
        scene = random_scene(rng)
        image_id = first_id + index
        file_name = f"{image_id:012d}.jpg"
        save_jpeg(render_scene(scene, size, rng), os.path.join(image_dir, file_name), rng)
        images.append(
            {
                "license": 1,
                "file_name": file_name,
                "coco_url": "",
                "height": size[1],
                "width": size[0],
                "date_captured": "2017-01-01 00:00:00",
                "flickr_url": "",
                "id": image_id,
            }
        )
        for number, caption in enumerate(scene_captions(scene, rng)):
            # Derived from the image id, so annotation ids are unique across splits, as in COCO.
            annotations.append({"image_id": image_id, "id": image_id * 10 + number, "caption": caption})
    document = {
        "info": {
            "description": "acc_clip demo dataset (synthetic shapes)",
            "url": "",
            "version": str(FORMAT_VERSION),
            "year": 2017,
            "contributor": "acc_clip",
            "date_created": "2017/01/01",
        },
        "licenses": [{"url": "", "id": 1, "name": "synthetic, no restrictions"}],
        "images": images,
        "annotations": annotations,
    }
    json_path = os.path.join(out_dir, "annotations", f"captions_{split}.json")
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(document, f)
    return json_path


def zeroshot_classes() -> list[tuple[str, Scene]]:
    """(folder name, scene) per class: one class per colour and shape, e.g. `red_circle`."""
    classes = [(f"{colour}_{shape}", Scene(colour, shape, 1, "")) for colour in SHAPE_COLOURS for shape in SHAPES]
    return sorted(classes)


def write_zeroshot(out_dir: str, per_class: int, size: tuple[int, int], seed: int) -> str:
    root = os.path.join(out_dir, "zeroshot")
    os.makedirs(root, exist_ok=True)
    classes = zeroshot_classes()
    for folder, target in classes:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for index in range(per_class):
            rng = image_rng(seed, f"zeroshot/{folder}", index)
            scene = target._replace(background=rng.choice(list(BACKGROUNDS)))
            save_jpeg(render_scene(scene, size, rng), os.path.join(root, folder, f"{index:04d}.jpg"), rng)
    with open(os.path.join(root, "classnames.txt"), "w", encoding="utf-8") as f:
        f.writelines(folder.replace("_", " ") + "\n" for folder, _ in classes)
    with open(os.path.join(root, "templates.txt"), "w", encoding="utf-8") as f:
        f.writelines(template + "\n" for template in ZEROSHOT_TEMPLATES)
    return root


def dataset_paths(out_dir: str) -> dict[str, str]:
    return {
        "root": out_dir,
        "train_images": os.path.join(out_dir, "train2017"),
        "val_images": os.path.join(out_dir, "val2017"),
        "train_annotations": os.path.join(out_dir, "annotations", "captions_train2017.json"),
        "val_annotations": os.path.join(out_dir, "annotations", "captions_val2017.json"),
        "zeroshot": os.path.join(out_dir, "zeroshot"),
        "manifest": os.path.join(out_dir, MANIFEST_NAME),
    }


def read_dataset_record(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def make_demo_data(
    out_dir: str,
    num_train: int = 1000,
    num_val: int = 200,
    size: tuple[int, int] = (640, 480),
    seed: int = 0,
    zeroshot_per_class: int = 20,
) -> dict[str, str]:
    """Write the demo dataset under `out_dir` and return its paths.

    An existing complete dataset made with the same parameters is reused as is; any other
    non-empty `out_dir` is refused rather than mixed with or overwritten."""
    if num_train < 1 or num_val < 1 or zeroshot_per_class < 0:
        raise UsageError("demo-data: --num-train and --num-val must be >= 1, zero-shot images per class >= 0")
    if size[0] < 16 or size[1] < 16:
        raise UsageError(f"demo-data: --size {size[0]}x{size[1]} is too small (at least 16x16)")
    out_dir = os.path.abspath(out_dir)
    paths = dataset_paths(out_dir)
    parameters = {
        "format_version": FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "size": [size[0], size[1]],
        "seed": seed,
        "zeroshot_per_class": zeroshot_per_class,
    }
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise UsageError(f"demo-data: {out_dir} exists and is not a folder")
        if os.listdir(out_dir):
            manifest = read_dataset_record(paths["manifest"])
            if manifest == parameters:
                return paths
            reason = (
                "holds a demo dataset made with other parameters"
                if manifest is not None
                else "is not empty and holds no complete demo dataset"
            )
            raise UsageError(f"demo-data: {out_dir} {reason}; remove it or choose another folder")
    os.makedirs(out_dir, exist_ok=True)
    write_split(out_dir, "train2017", 1, num_train, size, seed)
    write_split(out_dir, "val2017", 1 + num_train, num_val, size, seed)
    write_zeroshot(out_dir, zeroshot_per_class, size, seed)
    with open(paths["manifest"], "w", encoding="utf-8") as f:
        json.dump(parameters, f, indent=1)
    return paths


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acc-clip demo-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (created; reused if it already holds the same dataset)")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--size", type=parse_size, default=(640, 480), help="WIDTHxHEIGHT (default 640x480)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zeroshot-per-class", type=int, default=20)
    args = parser.parse_args(argv)
    paths = make_demo_data(args.out, args.num_train, args.num_val, args.size, args.seed, args.zeroshot_per_class)
    print(
        f"demo dataset in {paths['root']}: {args.num_train} train and {args.num_val} val images, "
        f"{len(zeroshot_classes())} zero-shot classes x {args.zeroshot_per_class}"
    )
    return 0
