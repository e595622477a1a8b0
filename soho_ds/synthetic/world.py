"""The synthetic world: scenes of coloured shapes and the true sentences about them.

Each image holds one to three coloured shapes of two sizes on a plain or gradient background,
square or not (landscape 4:3, portrait 3:4); every caption is generated from that scene graph,
so a model that learns colour, shape, size and position words can be measured (ITM accuracy,
retrieval) far above chance. The writers of pretraining shards and downstream sets build on it.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.20, "large": 0.38}  # side of the shape's box as a fraction of the image's shorter side
BACKGROUNDS = {
    "white": (235, 235, 235),
    "grey": (128, 128, 128),
    "black": (25, 25, 25),
    "beige": (225, 205, 170),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# Detector vocabulary of the synthetic set: the shape is the object class; colour and size are
# its attributes. The "region feature" is a fixed random projection of those three one-hots,
# standing in for a detector's 2048-d pooled feature.
OBJECT_CLASSES = list(SHAPES)
ATTRIBUTE_CLASSES = sorted(COLOURS) + sorted(SIZES)
REGION_FEATURE_DIM = 64
_PROJECTION = np.random.default_rng(20230).standard_normal(
    (len(OBJECT_CLASSES) + len(ATTRIBUTE_CLASSES), REGION_FEATURE_DIM)).astype(np.float32) / 3.0


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive end

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def object_id(self) -> int:
        return OBJECT_CLASSES.index(self.shape)

    @property
    def attribute_ids(self) -> list[int]:
        return [ATTRIBUTE_CLASSES.index(self.colour), ATTRIBUTE_CLASSES.index(self.size)]

    def region_feature(self) -> np.ndarray:
        code = np.zeros(len(OBJECT_CLASSES) + len(ATTRIBUTE_CLASSES), dtype=np.float32)
        code[self.object_id] = 1.0
        code[[len(OBJECT_CLASSES) + a for a in self.attribute_ids]] = 1.0
        return code @ _PROJECTION

    def phrase(self, with_size: bool = True) -> str:
        words = " ".join(([self.size] if with_size else []) + [self.colour, self.shape])
        return ("an " if words[0] in "aeiou" else "a ") + words


@dataclass(frozen=True)
class Scene:
    background: str
    objects: list[ShapeObject]
    width: int
    height: int


def image_shape(rng: random.Random, side: int, non_square: float) -> tuple[int, int]:
    """(width, height): square with side `side`, or with probability `non_square` 4:3 or 3:4 with that
    shorter side."""
    if rng.random() >= non_square:
        return side, side
    longer = side * 4 // 3
    return (longer, side) if rng.random() < 0.5 else (side, longer)


def _place(rng: random.Random, side: int, width: int, height: int, taken: list[tuple]) -> tuple | None:
    """Random box of the given side that overlaps no box in `taken` (with a margin)."""
    margin = max(2, min(width, height) // 32)
    for _ in range(100):
        x0 = rng.randint(margin, width - side - margin)
        y0 = rng.randint(margin, height - side - margin)
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] + margin <= t[0] or t[2] + margin <= box[0] or
               box[3] + margin <= t[1] or t[3] + margin <= box[1] for t in taken):
            return box
    return None


def sample_scene(rng: random.Random, width: int, height: int | None = None) -> Scene:
    """A background and 1-3 non-overlapping shapes with distinct (colour, shape)."""
    height = width if height is None else height
    background = rng.choice(sorted(BACKGROUNDS))
    count = rng.choice((1, 2, 2, 3))
    objects: list[ShapeObject] = []
    used = set()
    for _ in range(count):
        size = rng.choice(sorted(SIZES))
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        if (colour, shape) in used:
            continue
        box = _place(rng, int(SIZES[size] * min(width, height)), width, height, [o.box for o in objects])
        if box is None:
            continue
        used.add((colour, shape))
        objects.append(ShapeObject(shape, colour, size, box))
    return Scene(background, objects, width, height)


def render(scene: Scene, rng: random.Random, background: str | None = None) -> Image.Image:
    w, h = scene.width, scene.height
    base = BACKGROUNDS[background or scene.background]
    img = Image.new("RGB", (w, h), base)
    draw = ImageDraw.Draw(img)
    # A faint vertical gradient plus speckle so the background is not a constant.
    shade = rng.uniform(-25, 25)
    for y in range(h):
        t = shade * (y / h - 0.5)
        draw.line([(0, y), (w, y)], fill=tuple(int(min(255, max(0, c + t))) for c in base))
    for _ in range(max(w, h)):
        x, y = rng.randrange(w), rng.randrange(h)
        v = rng.randint(-30, 30)
        draw.point((x, y), fill=tuple(int(min(255, max(0, c + v))) for c in base))
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:  # diamond
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill)
    return img


def _region(obj: ShapeObject, scene: Scene) -> str:
    cx, cy = obj.centre
    row = ("top", "middle", "bottom")[min(2, int(3 * cy // scene.height))]
    col = ("left", "centre", "right")[min(2, int(3 * cx // scene.width))]
    if row == "middle" and col == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"in the {row} {col}"


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where `a` is relative to `b`, by the larger of the two centre offsets."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def captions_for(scene: Scene) -> list[str]:
    """Five true captions of different kinds (attributes, relations, count, background)."""
    objects = scene.objects
    first = objects[0]
    caps = [f"{first.phrase()} {_region(first, scene)}"]
    if len(objects) >= 2:
        a, b = objects[0], objects[1]
        caps.append(f"{a.phrase()} {_relation(a, b)} {b.phrase()}")
        caps.append(" and ".join(o.phrase(with_size=False) for o in objects) + f" on a {scene.background} background")
    else:
        caps.append(f"{first.phrase(with_size=False)} on a {scene.background} background")
        caps.append(f"a single {first.colour} {first.shape}")
    caps.append(f"{NUMBER_WORDS[len(objects)]} shape{'s' if len(objects) > 1 else ''}: "
                + ", ".join(o.phrase() for o in objects))
    last = objects[-1]
    caps.append(f"there is {last.phrase()} {_region(last, scene)}")
    return caps


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
