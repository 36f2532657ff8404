"""The embedded default data set: procedurally rendered compositional scenes.

Each scene holds 1 to 3 objects (colour, shape, size, position) on a plain, slightly noisy background. Every
training sample gets the annotation record of ARCHITECTURE.md:
- `alt_text`: what the web would give: short, partial, sometimes wrong or irrelevant;
- `positive_description`: exact and complete; `negative_description`: the same template with one or two
  attributes changed (minimal-edit counterfactual);
- `positive_tags` / `negative_tags`: attributes that are present / absent.
Also a held-out zero-shot set (single objects, classes "{colour} {shape}"), a hard-negative set (image,
positive text, negative text differing in one object's colour or shape) and a retrieval set (scenes of 2 or 3
objects with one or two captions each; hqclip_fast.data.benchmark_sets writes it and the zero-shot set in
clip_benchmark's layout) and a WinoGAViL-style association set (a colour or shape as the cue, single-object
candidates named "{colour} {shape}", those that have it as associations). Everything is a pure function of the seed: the same arguments give byte-identical
shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .tags import TagVocab

COLOURS = {
    "red": (215, 30, 35), "green": (35, 165, 50), "blue": (35, 70, 220),
    "yellow": (240, 215, 25), "purple": (135, 45, 175), "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Object side as a fraction of the image side: large enough that a shape spans several ViT patches at 32 px.
SIZES = {"small": 0.3, "medium": 0.42, "large": 0.55}
# 3x3 grid of positions; objects of one scene occupy distinct cells.
POSITIONS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
# Scenes hold 1 to 3 objects; single objects are the most common so that attribute binding can be learned.
OBJECT_COUNT_PROBS = (0.5, 0.3, 0.2)
BACKGROUNDS = {"light gray": (200, 200, 200), "dark gray": (70, 70, 70), "beige": (225, 210, 180)}
# The zero-shot classes: 4 colours x 3 shapes = 12 classes (chance 1/12).
ZEROSHOT_COLOURS = ("red", "green", "blue", "yellow")
ZEROSHOT_SHAPES = ("circle", "square", "triangle")
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a {} on a plain background.", "an image of a {}.", "a rendering of a {}.")
_SPLIT_IDS = {"train": 0, "zeroshot": 1, "hardneg": 2, "retrieval": 3, "association": 4}
# How often a training negative edits each attribute: mostly what binds an object (its colour and shape), the
# attributes a tiny vision tower learns last, as a captioner asked for minimal edits of objects would.
TRAIN_EDIT_WEIGHTS = {"colour": 0.3, "shape": 0.4, "size": 0.15, "position": 0.15}
# Bumped whenever the generator's output changes, so that a cached set from older code is regenerated.
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str

    def _listed(self) -> str:
        parts = [o.phrase() for o in self.objects]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def describe(self) -> str:
        body = self._listed()
        return f"{body[0].upper()}{body[1:]}, on a {self.background} background."

    def describe_background_first(self) -> str:
        """A second phrasing of describe(): the same facts, background first."""
        return f"On a {self.background} background: {self._listed()}."


def _sample_scene(rng: np.random.Generator, num_objects: int, colours=tuple(COLOURS), shapes=SHAPES) -> Scene:
    cells = rng.choice(len(POSITIONS), size=num_objects, replace=False)
    names = list(POSITIONS)
    objects = tuple(
        SceneObject(str(rng.choice(colours)), str(rng.choice(shapes)), str(rng.choice(list(SIZES))), names[c])
        for c in cells
    )
    return Scene(objects, str(rng.choice(list(BACKGROUNDS))))


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw at 2x and downsample (anti-aliased edges), then add mild pixel noise."""
    scale = 2 * image_size
    img = Image.new("RGB", (scale, scale), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = scale / 3
    # Largest first, so that a small object is never hidden behind a large one.
    for obj in sorted(scene.objects, key=lambda o: -SIZES[o.size]):
        gx, gy = POSITIONS[obj.position]
        side = SIZES[obj.size] * scale
        jitter = (cell - side * 0.6) * 0.25
        cx = (gx + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (gy + 0.5) * cell + rng.uniform(-jitter, jitter)
        # Keep the whole object inside the image: a clipped square would look like a rectangle.
        cx, cy = (float(np.clip(v, side / 2 + 1, scale - side / 2 - 1)) for v in (cx, cy))
        _draw_shape(draw, obj.shape, cx, cy, side / 2, COLOURS[obj.colour])
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"shape: unknown shape {shape!r}")


def _edit_object(obj: SceneObject, attribute: str, rng: np.random.Generator, colours=tuple(COLOURS),
                 shapes=SHAPES, taken_positions=()) -> SceneObject:
    if attribute == "colour":
        return SceneObject(str(rng.choice([c for c in colours if c != obj.colour])), obj.shape, obj.size, obj.position)
    if attribute == "shape":
        return SceneObject(obj.colour, str(rng.choice([s for s in shapes if s != obj.shape])), obj.size, obj.position)
    if attribute == "size":
        return SceneObject(obj.colour, obj.shape, str(rng.choice([s for s in SIZES if s != obj.size])), obj.position)
    free = [p for p in POSITIONS if p not in taken_positions]
    return SceneObject(obj.colour, obj.shape, obj.size, str(rng.choice(free)))


def counterfactual(scene: Scene, rng: np.random.Generator, num_edits: int,
                   attributes=("colour", "shape", "size", "position"), weights=None) -> Scene:
    """The same scene with `num_edits` attribute changes on distinct objects or attributes; `weights`: how
    likely each attribute is to be the one edited (uniform by default)."""
    objects = list(scene.objects)
    done: set[tuple[int, str]] = set()
    while len(done) < num_edits:
        i, attribute = int(rng.integers(len(objects))), str(rng.choice(attributes, p=weights))
        if (i, attribute) in done:
            continue
        done.add((i, attribute))
        objects[i] = _edit_object(objects[i], attribute, rng, taken_positions=[o.position for o in objects])
    return Scene(tuple(objects), scene.background)


def _alt_text(scene: Scene, rng: np.random.Generator, index: int) -> str:
    """Web-like alt text: mostly a partial truth, sometimes wrong, sometimes irrelevant."""
    first = scene.objects[int(rng.integers(len(scene.objects)))]
    kind = rng.random()
    if kind < 0.45:
        return f"{first.colour} {first.shape}"
    if kind < 0.65:
        return f"{len(scene.objects)} shape{'s' if len(scene.objects) > 1 else ''} on {scene.background}"
    if kind < 0.8:
        wrong = _edit_object(first, str(rng.choice(("colour", "shape"))), rng)
        return f"a {wrong.colour} {wrong.shape}"
    if kind < 0.9:
        return f"IMG_{index:05d}.jpg"
    return str(rng.choice(["stock photo", "abstract art", "click here", "geometric shapes wallpaper"]))


def _tags(scene: Scene, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    positive: list[str] = []
    for o in scene.objects:
        for t in (o.colour, o.shape, f"{o.colour} {o.shape}", o.size):
            if t not in positive:
                positive.append(t)
    positive.append(f"{scene.background} background")
    present_colours = {o.colour for o in scene.objects}
    present_shapes = {o.shape for o in scene.objects}
    absent = [c for c in COLOURS if c not in present_colours] + [s for s in SHAPES if s not in present_shapes]
    count = min(len(absent), int(rng.integers(2, 5)))
    negative = [str(t) for t in rng.choice(absent, size=count, replace=False)]
    return positive, negative


def make_train_record(index: int, seed: int, image_size: int) -> tuple[bytes, dict]:
    rng = np.random.default_rng([seed, _SPLIT_IDS["train"], index])
    scene = _sample_scene(rng, int(rng.choice([1, 2, 3], p=OBJECT_COUNT_PROBS)))
    negative = counterfactual(scene, rng, num_edits=int(rng.integers(1, 3)),
                              attributes=tuple(TRAIN_EDIT_WEIGHTS), weights=list(TRAIN_EDIT_WEIGHTS.values()))
    positive_tags, negative_tags = _tags(scene, rng)
    key = f"train{index:08d}"
    record = {
        "key": key,
        "alt_text": _alt_text(scene, rng, index),
        "positive_description": scene.describe(),
        "negative_description": negative.describe(),
        "positive_tags": positive_tags,
        "negative_tags": negative_tags,
    }
    return encode_image(render(scene, image_size, rng)), record


def make_zeroshot_sample(index: int, seed: int, image_size: int, image_format: str = "jpg") -> tuple[bytes, int]:
    rng = np.random.default_rng([seed, _SPLIT_IDS["zeroshot"], index])
    label = index % (len(ZEROSHOT_COLOURS) * len(ZEROSHOT_SHAPES))
    colour, shape = ZEROSHOT_COLOURS[label // len(ZEROSHOT_SHAPES)], ZEROSHOT_SHAPES[label % len(ZEROSHOT_SHAPES)]
    position = str(rng.choice(list(POSITIONS)))
    scene = Scene((SceneObject(colour, shape, str(rng.choice(["medium", "large"])), position),),
                  str(rng.choice(list(BACKGROUNDS))))
    return encode_image(render(scene, image_size, rng), image_format), label


def make_hardneg_sample(index: int, seed: int, image_size: int) -> tuple[bytes, dict]:
    rng = np.random.default_rng([seed, _SPLIT_IDS["hardneg"], index])
    scene = _sample_scene(rng, int(rng.integers(1, 3)))
    negative = counterfactual(scene, rng, num_edits=1, attributes=("colour", "shape"))
    key = f"hardneg{index:08d}"
    record = {"key": key, "positive_text": scene.describe(), "negative_text": negative.describe()}
    return encode_image(render(scene, image_size, rng)), record


def make_retrieval_sample(index: int, seed: int, image_size: int, image_format: str = "jpg"
                          ) -> tuple[bytes, list[str]]:
    """A scene of 2 or 3 objects (so that two images rarely share a caption) and one or two captions."""
    rng = np.random.default_rng([seed, _SPLIT_IDS["retrieval"], index])
    scene = _sample_scene(rng, int(rng.integers(2, 4)))
    captions = [scene.describe(), scene.describe_background_first()][: int(rng.integers(1, 3))]
    return encode_image(render(scene, image_size, rng), image_format), captions


# WinoGAViL's candidate counts (DataComp groups its scores by them).
ASSOCIATION_CANDIDATES = (5, 6, 10, 12)


def make_association_example(index: int, seed: int, image_size: int) -> dict:
    """A row shaped like nlphuji/winogavil's: 5, 6, 10 or 12 single-object candidates (in turn), the cue one
    candidate's colour or shape, the associations every candidate that has it; candidate_images as PIL images."""
    rng = np.random.default_rng([seed, _SPLIT_IDS["association"], index])
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), ASSOCIATION_CANDIDATES[index % 4], replace=False)]
    by_colour = bool(rng.integers(2))
    cue = chosen[0][0] if by_colour else chosen[0][1]
    images = [render(Scene((SceneObject(c, s, "large", "center"),), str(rng.choice(list(BACKGROUNDS)))),
                     image_size, rng) for c, s in chosen]
    return {"cue": cue, "candidates": [f"{c} {s}" for c, s in chosen],
            "associations": [f"{c} {s}" for c, s in chosen if cue == (c if by_colour else s)],
            "candidate_images": images}


def zeroshot_classnames() -> list[str]:
    return [f"{c} {s}" for c in ZEROSHOT_COLOURS for s in ZEROSHOT_SHAPES]


def encode_image(img: Image.Image, image_format: str = "jpg") -> bytes:
    """JPEG (quality 92) or lossless WebP (how clip_benchmark's converter writes images by default)."""
    options = {"jpg": {"format": "JPEG", "quality": 92}, "webp": {"format": "WEBP", "lossless": True}}
    if image_format not in options:
        raise ValueError(f"image_format must be one of {sorted(options)}, got {image_format!r}")
    buf = io.BytesIO()
    img.save(buf, **options[image_format])
    return buf.getvalue()


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata, so that shards are byte-identical across runs."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = "hqclip"
    tar.addfile(info, io.BytesIO(data))


def _write_split(out_dir: str, split: str, num: int, shard_size: int, make) -> str:
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    num_shards = max(1, -(-num // shard_size))
    for s in range(num_shards):
        with tarfile.open(os.path.join(out_dir, split, f"shard-{s:06d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(s * shard_size, min(num, (s + 1) * shard_size)):
                key, members = make(index)
                for ext, data in members:
                    add_tar_member(tar, f"{key}.{ext}", data)
    return os.path.join(out_dir, split, f"shard-{{000000..{num_shards - 1:06d}}}.tar")


def write_synthetic(out_dir: str, num_samples: int, shard_size: int = 1000, seed: int = 0, image_size: int = 64,
                    num_zeroshot: int = 600, num_hardneg: int = 500, tag_vocab_size: int = 256) -> dict:
    """Write train/zeroshot/hardneg shards, tags.json and manifest.json under `out_dir`; return the manifest."""
    for name, value in (("num_samples", num_samples), ("shard_size", shard_size), ("image_size", image_size)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 to draw recognizable shapes, got {image_size}")
    out_dir = os.path.abspath(out_dir)
    tag_lists: list[list[str]] = []

    def train(i):
        jpg, record = make_train_record(i, seed, image_size)
        tag_lists.append(record["positive_tags"])
        return record["key"], [("jpg", jpg), ("json", json.dumps(record).encode())]

    def zeroshot(i):
        jpg, label = make_zeroshot_sample(i, seed, image_size)
        return f"zeroshot{i:08d}", [("jpg", jpg), ("cls", str(label).encode())]

    def hardneg(i):
        jpg, record = make_hardneg_sample(i, seed, image_size)
        return record["key"], [("jpg", jpg), ("json", json.dumps(record).encode())]

    manifest = {
        "train": _write_split(out_dir, "train", num_samples, shard_size, train),
        "num_train": num_samples,
        "zeroshot": _write_split(out_dir, "zeroshot", num_zeroshot, shard_size, zeroshot),
        "num_zeroshot": num_zeroshot,
        "classnames": zeroshot_classnames(),
        "templates": list(ZEROSHOT_TEMPLATES),
        "hardneg": _write_split(out_dir, "hardneg", num_hardneg, shard_size, hardneg),
        "num_hardneg": num_hardneg,
        "tags": os.path.join(out_dir, "tags.json"),
        "image_size": image_size,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
    }
    TagVocab.build(tag_lists, size=tag_vocab_size).save(manifest["tags"])
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
