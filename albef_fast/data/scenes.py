"""Synthetic image-caption pairs ("scenes") for the embedded demo, generated locally.

Nothing can be downloaded, yet the demo must pretrain a real ALBEF model on real image-text pairs and
then measure zero-shot image-text retrieval. So we draw our own: each image shows 1 to 3 flat
coloured shapes on a plain dark background, and each image gets 3 to 5 captions that describe it in
varied English ("a large red circle to the left of a small blue square", "two objects: ...",
"from left to right: ...").

Why it looks the way it does:

* A tiny ALBEF (ViT on 64x64 px with 8x8 patches, 2+2-layer BERT of width 128) trains on it for about
  ten minutes on a 2-core CPU. Shapes are therefore big (a "small" object is still ~1.5 patches wide
  at 64 px, a "large" one ~3), colours are far apart in RGB, and the attribute vocabulary is small:
  5 shapes x 7 colours x 2 sizes. Every word is a single bert-base-uncased WordPiece.
* Retrieval needs a well-defined answer, so every caption names *all* objects with shape, colour and
  size, and the held-out split is resampled until (almost) no two scenes share an attribute multiset;
  captions of different eval scenes therefore never coincide.
* Relations (left of / right of / above / below) and single-object positions are computed from the
  drawn geometry with a safety margin, and layouts are rejection-sampled so that objects do not
  overlap and every pair is clearly more horizontal than vertical (or the reverse).

Layout under ``root/<folder named from the generator version and the parameters>/``::

    train.json, eval.json              ALBEF pretrain format: [{"image": abs path, "caption": [...]}]
    train_scenes.json, eval_scenes.json  per-image object metadata (shape, colour, size, centre, radius)
    images/{train,eval}/NNNNNN.jpg     RGB JPEG, image_size x image_size
    manifest.json                      written last; its presence marks the folder complete

Generation is deterministic (numpy Generators seeded from ``(seed, split)``; drawing itself uses no
randomness) and atomic (built in a temporary sibling folder, then renamed into place).

Note for users of this data: left/right captions become false under horizontal flips, and absolute
positions ("at the top") under aggressive crops, so augmentations must respect that.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLOURS", "GENERATOR_VERSION", "SHAPES", "SIZES", "SceneSplits", "ensure_scenes"]

# Bump whenever the output for the same parameters changes: it is part of the folder name, so stale
# caches are simply never looked at again.
GENERATOR_VERSION = "scenes-v1"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}

# Saturated hues spread around the colour wheel plus white; all stay well apart after JPEG and
# bilinear downscaling, and all contrast with the dark grey background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (250, 140, 15),
    "yellow": (245, 230, 35),
    "green": (35, 185, 55),
    "blue": (40, 90, 240),
    "purple": (155, 55, 210),
    "white": (245, 245, 245),
}

# Half-extent of an object as a fraction of the image side. The 1.9x ratio keeps "small" and "large"
# unambiguous even after the +-6 % jitter.
SIZES: dict[str, float] = {"small": 0.10, "large": 0.19}
_SIZE_JITTER = 0.06
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}

_N_OBJECTS_P = (0.2, 0.4, 0.4)  # P(1), P(2), P(3) objects
_DUPLICATE_P = 0.15  # chance that a multi-object scene repeats an object ("two red circles")
_GAP = 0.04  # min free space between bounding boxes, fraction of the side
_DOMINANCE = 1.4  # each pair: |major axis offset| >= 1.4 |minor axis offset|, so one relation is obvious
_REL_MARGIN = 0.12  # a relation is stated only if centres differ by this much along its axis
_MAX_WORDS = 20
_SUPERSAMPLE = 2  # draw at 2x, then downsample: anti-aliased edges without a slow drawing library
_JPEG_QUALITY = 90

_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_REL_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_REL_SHORT = {"left": ("left of",), "right": ("right of",), "above": ("above", "over"),
              "below": ("below", "under")}
_NUMBER = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class SceneSplits:
    # ALBEF pretrain format: JSON list of {"image": "<absolute path>", "caption": ["...", "..."]}
    train_json: Path
    # same format; each entry's "caption" is a list of all its reference captions
    eval_json: Path


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: str
    size: str
    x: float  # centre, pixels of the final image
    y: float
    r: float  # half-extent, pixels

    @property
    def attrs(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.size)


@dataclass(frozen=True)
class _Scene:
    objects: tuple[_Object, ...]
    background: tuple[int, int, int]
    image_size: int


# --------------------------------------------------------------------------------------------------
# Geometry


def _relations(a: _Object, b: _Object, size: int) -> list[str]:
    """Every relation word that is clearly true of `a` relative to `b` (a is <word> b)."""
    m = _REL_MARGIN * size
    out = []
    if b.x - a.x >= m:
        out.append("left")
    if a.x - b.x >= m:
        out.append("right")
    if b.y - a.y >= m:  # image y grows downwards
        out.append("above")
    if a.y - b.y >= m:
        out.append("below")
    return out


def _primary_relation(a: _Object, b: _Object) -> str:
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"


def _group_relations(g: Sequence[_Object], h: Sequence[_Object], size: int) -> list[str]:
    """Relations true for every member of g against every member of h, strongest first."""
    common = None
    for a in g:
        for b in h:
            rels = set(_relations(a, b, size))
            common = rels if common is None else common & rels
    if not common:
        return []
    axis = {"left": "x", "right": "x", "above": "y", "below": "y"}

    def strength(rel: str) -> float:
        return min(abs(getattr(a, axis[rel]) - getattr(b, axis[rel])) for a in g for b in h)

    return sorted(common, key=lambda r: (-strength(r), r))


def _region(o: _Object, size: int) -> tuple[int, int]:
    """(row, col) of the 3x3 grid cell holding the centre."""
    return (min(2, int(3 * o.y / size)), min(2, int(3 * o.x / size)))


def _layout_ok(objs: Sequence[_Object], size: int) -> bool:
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            dx, dy = abs(a.x - b.x), abs(a.y - b.y)
            # Axis-aligned boxes are disjoint with a gap iff they are separated along one axis.
            if max(dx - a.r - b.r, dy - a.r - b.r) < _GAP * size:
                return False
            if max(dx, dy) < _DOMINANCE * min(dx, dy):
                return False
    return True


# --------------------------------------------------------------------------------------------------
# Sampling


def _sample_attrs(rng: np.random.Generator) -> tuple[str, str, str]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    return shape, colour, size


def _sample_scene(rng: np.random.Generator, image_size: int) -> _Scene:
    """One random scene. All randomness of an image lives here; drawing is a pure function of it."""
    s = float(image_size)
    pad = 0.02 * s
    while True:
        n = int(rng.choice(3, p=_N_OBJECTS_P)) + 1
        attrs = [_sample_attrs(rng) for _ in range(n)]
        if n >= 2 and rng.random() < _DUPLICATE_P:
            attrs[1] = attrs[0]
        radii = [SIZES[a[2]] * s * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)) for a in attrs]
        if n == 1:
            # Put a lone object near the centre of a random 3x3 cell so "at the top left" is never borderline.
            row, col = int(rng.integers(3)), int(rng.integers(3))
            r = radii[0]
            x = np.clip((col + 0.5) / 3 * s + rng.uniform(-0.05, 0.05) * s, r + pad, s - r - pad)
            y = np.clip((row + 0.5) / 3 * s + rng.uniform(-0.05, 0.05) * s, r + pad, s - r - pad)
            objs = [_Object(*attrs[0], x=float(x), y=float(y), r=float(r))]
        else:
            objs = None
            # Three large objects rarely fit a 1.4-dominance layout; after a few hundred failures we
            # resample the attributes instead of looping on a near-impossible configuration.
            for _ in range(300):
                cand = [
                    _Object(*a, x=float(rng.uniform(r + pad, s - r - pad)),
                            y=float(rng.uniform(r + pad, s - r - pad)), r=float(r))
                    for a, r in zip(attrs, radii)
                ]
                if _layout_ok(cand, image_size):
                    objs = cand
                    break
            if objs is None:
                continue
        # Lightly varied dark grey: the model should not key on one exact background value.
        level = int(rng.integers(45, 86))
        r_, g_, b_ = (int(level + rng.integers(-6, 7)) for _ in range(3))
        return _Scene(objects=tuple(objs), background=(r_, g_, b_), image_size=image_size)


def _signature(scene: _Scene) -> tuple[tuple, tuple]:
    """(attribute multiset, layout): two eval scenes with equal signatures would be indistinguishable."""
    attrs = tuple(sorted(o.attrs for o in scene.objects))
    objs = scene.objects
    if len(objs) == 1:
        return attrs, (_region(objs[0], scene.image_size),)
    rels = []
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            rel = _primary_relation(a, b)
            # Canonical direction: "X right of Y" is the same fact as "Y left of X".
            if rel in ("right", "below"):
                rels.append((b.attrs, _INVERSE[rel], a.attrs))
            else:
                rels.append((a.attrs, rel, b.attrs))
    return attrs, tuple(sorted(rels))


def _sample_split(rng: np.random.Generator, n: int, image_size: int, unique: bool) -> list[_Scene]:
    if not unique:
        return [_sample_scene(rng, image_size) for _ in range(n)]
    # Prefer scenes whose attribute multiset is new (then every caption names a unique image); once
    # that gets hard (many eval scenes) accept a new (attributes, layout) pair; collide only as a last resort.
    strict_tries, max_tries = 200, 2000
    used_attrs: set[tuple] = set()
    used_full: set[tuple] = set()
    out = []
    for _ in range(n):
        for attempt in range(max_tries):
            scene = _sample_scene(rng, image_size)
            attrs, layout = _signature(scene)
            if attrs not in used_attrs or (attempt >= strict_tries and (attrs, layout) not in used_full):
                break
        used_attrs.add(attrs)
        used_full.add((attrs, layout))
        out.append(scene)
    return out


# --------------------------------------------------------------------------------------------------
# Captions


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _groups(objs: Sequence[_Object]) -> list[list[_Object]]:
    """Objects with identical attributes are described together ("two red circles")."""
    groups: dict[tuple, list[_Object]] = {}
    for o in objs:
        groups.setdefault(o.attrs, []).append(o)
    return list(groups.values())


def _np(g: Sequence[_Object], rng: np.random.Generator, article: bool = True) -> str:
    shape, colour, size = g[0].attrs
    sw = _pick(rng, _SIZE_WORDS[size])
    if len(g) == 1:
        return f"{'a ' if article else ''}{sw} {colour} {shape}"
    return f"{_NUMBER[len(g)]} {sw} {colour} {_PLURAL[shape]}"


def _ref(g: Sequence[_Object], groups: Sequence[Sequence[_Object]], rng: np.random.Generator) -> str:
    """Shortest definite reference that picks out exactly group g."""
    shape, colour, size = g[0].attrs
    noun = shape if len(g) == 1 else _PLURAL[shape]
    others = [h[0] for h in groups if h is not g]
    if all(o.shape != shape for o in others):
        return f"the {noun}"
    if all((o.shape, o.colour) != (shape, colour) for o in others):
        return f"the {colour} {noun}"
    return f"the {_pick(rng, _SIZE_WORDS[size])} {colour} {noun}"


def _be(g: Sequence[_Object]) -> str:
    return "is" if len(g) == 1 else "are"


def _region_phrase(row: int, col: int, rng: np.random.Generator) -> str:
    if (row, col) == (1, 1):
        return _pick(rng, ("in the middle", "in the centre", "in the center"))
    h = {0: "left", 2: "right"}.get(col)
    if row == 1:
        return _pick(rng, (f"on the {h}", f"on the {h} side", f"at the {h} side"))
    v, v2 = ("top", "upper") if row == 0 else ("bottom", "lower")
    if h is None:
        return _pick(rng, (f"at the {v}", f"near the {v}", f"in the {v2} part"))
    return _pick(rng, (f"in the {v} {h} corner", f"at the {v} {h}", f"in the {v2} {h}"))


def _candidates(scene: _Scene, rng: np.random.Generator) -> list[Callable[[], str]]:
    """Caption templates that are true for this scene (each a thunk drawing its own synonyms)."""
    size = scene.image_size
    groups = _groups(scene.objects)
    total = len(scene.objects)
    c: list[Callable[[], str]] = []

    if len(groups) == 1 and total == 1:
        o = scene.objects[0]
        g = [o]
        row, col = _region(o, size)
        where = lambda: _region_phrase(row, col, rng)
        c += [
            lambda: f"{_np(g, rng)} {where()}",
            lambda: f"there is {_np(g, rng)} {where()}",
            lambda: f"{_np(g, rng, article=False)} {where()}",
            lambda: f"the picture shows {_np(g, rng)} {where()}",
            lambda: (f"{_article(o.colour)} {o.colour} {o.shape} {where()}, "
                     f"it is {_pick(rng, _SIZE_WORDS[o.size])}"),
            lambda: f"{where()}: {_np(g, rng)}",
            lambda: f"a single {_np(g, rng, article=False)} on a dark background",
            lambda: f"only one object, {_np(g, rng)}",
        ]
        return c

    if len(groups) == 1:
        g = groups[0]
        o = g[0]
        num, plural = _NUMBER[len(g)], _PLURAL[o.shape]
        sw = lambda: _pick(rng, _SIZE_WORDS[o.size])
        c += [
            lambda: _np(g, rng),
            lambda: f"there are {num} {o.colour} {plural}, {'both' if len(g) == 2 else 'all'} {sw()}",
            lambda: f"{num} {o.colour} {plural} of the same {o.size} size",
            lambda: f"an image with {_np(g, rng)}",
        ]
        if len(g) == 2:
            c.append(lambda: f"a pair of {sw()} {o.colour} {plural}")
            a, b = g
            dx, dy = abs(a.x - b.x), abs(a.y - b.y)
            # Layout sampling guarantees one axis dominates by >= 1.4x, so these are unambiguous.
            if dx > dy:
                c.append(lambda: f"{_np(g, rng)} {_pick(rng, ('side by side', 'next to each other'))}")
            else:
                c.append(lambda: f"{_np(g, rng)}, one {_pick(rng, ('above', 'over'))} the other")
        else:
            c.append(lambda: f"a group of {_np(g, rng)}")
        return c

    if len(groups) == 2:
        g, h = groups
        if rng.random() < 0.5:
            g, h = h, g
        rels = _group_relations(g, h, size)
        c += [
            lambda: f"{_NUMBER[total]} objects: {_np(g, rng)} and {_np(h, rng)}",
            lambda: f"{_np(g, rng, article=False)}, {_np(h, rng, article=False)}",
            lambda: f"{_np(h, rng)} and {_np(g, rng)}",
            lambda: f"an image with {_np(g, rng)} and {_np(h, rng)}",
        ]
        if rels:
            rel = rels[0]
            inv = _INVERSE[rel]
            c += [
                lambda: f"{_np(g, rng)} {_pick(rng, _REL_WORDS[rel])} {_np(h, rng)}",
                lambda: f"{_np(h, rng)} {_pick(rng, _REL_WORDS[inv])} {_np(g, rng)}",
                lambda: f"there {_be(g)} {_np(g, rng)} {_pick(rng, _REL_WORDS[rel])} {_np(h, rng)}",
                lambda: (f"{_np(g, rng)} and {_np(h, rng)}, {_ref(g, groups, rng)} {_be(g)} "
                         f"{_pick(rng, _REL_SHORT[rel])} {_ref(h, groups, rng)}"),
                lambda: (f"{_np(g, rng)} with {_np(h, rng)} {_pick(rng, _REL_WORDS[inv])} "
                         f"{'it' if len(g) == 1 else 'them'}"),
            ]
        return c

    # Three different objects.
    objs = list(scene.objects)
    order = [objs[i] for i in rng.permutation(3)]
    a, b, d = ([o] for o in order)
    c += [
        lambda: f"{_np(a, rng)}, {_np(b, rng)} and {_np(d, rng)}",
        lambda: f"three objects: {_np(a, rng)}, {_np(b, rng)} and {_np(d, rng)}",
        lambda: f"{_np(a, rng, article=False)}, {_np(b, rng, article=False)}, {_np(d, rng, article=False)}",
    ]
    rel_ab = _group_relations(a, b, size)
    rel_db = _group_relations(d, b, size)
    if rel_ab:
        c.append(lambda: (f"{_np(a, rng)} {_pick(rng, _REL_SHORT[rel_ab[0]])} {_np(b, rng)}, "
                          f"and {_np(d, rng)}"))
        if rel_db:
            c.append(lambda: (f"{_np(a, rng)} {_pick(rng, _REL_SHORT[rel_ab[0]])} {_np(b, rng)}, with "
                              f"{_np(d, rng)} {_pick(rng, _REL_SHORT[rel_db[0]])} {_ref(b, groups, rng)}"))
    m = _REL_MARGIN * size
    by_x = sorted(objs, key=lambda o: o.x)
    if all(q.x - p.x >= m for p, q in itertools.pairwise(by_x)):
        c.append(lambda: "from left to right: " + _list3(by_x, rng))
    by_y = sorted(objs, key=lambda o: o.y)
    if all(q.y - p.y >= m for p, q in itertools.pairwise(by_y)):
        c.append(lambda: "from top to bottom: " + _list3(by_y, rng))
    return c


def _list3(objs: Sequence[_Object], rng: np.random.Generator) -> str:
    return f"{_np([objs[0]], rng)}, {_np([objs[1]], rng)} and {_np([objs[2]], rng)}"


def _captions(scene: _Scene, rng: np.random.Generator) -> list[str]:
    """3 to 5 distinct true captions for a scene."""
    cands = _candidates(scene, rng)
    k = int(rng.integers(3, 6))
    out: list[str] = []
    for i in rng.permutation(len(cands)):
        text = cands[int(i)]()
        if text not in out and len(text.split()) <= _MAX_WORDS:
            out.append(text)
            if len(out) == k:
                break
    if len(out) < 3:  # every branch offers >= 4 short templates; this guards future edits
        raise RuntimeError(f"only {len(out)} captions for {scene}")
    return out


# --------------------------------------------------------------------------------------------------
# Drawing


def _render(scene: _Scene) -> Image.Image:
    k = _SUPERSAMPLE
    side = scene.image_size * k
    img = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x, y, r = o.x * k, o.y * k, o.r * k
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":
            # A square of half-side r looks much heavier than a circle of radius r; 0.88 evens out area.
            q = 0.88 * r
            draw.rectangle((x - q, y - q, x + q, y + q), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        elif o.shape == "cross":
            t = 0.36 * r  # arms thick enough to survive downscaling to 64 px as a visible "+"
            draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
            draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
        else:
            raise ValueError(o.shape)
    return img.resize((scene.image_size, scene.image_size), Image.Resampling.BOX)


def _write_image(scene: _Scene, path: str) -> None:
    _render(scene).save(path, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)


# --------------------------------------------------------------------------------------------------
# Cache folder


def _folder_name(n_train: int, n_eval: int, image_size: int, seed: int) -> str:
    return f"{GENERATOR_VERSION}_train{n_train}_eval{n_eval}_px{image_size}_seed{seed}"


def _params(n_train: int, n_eval: int, image_size: int, seed: int) -> dict:
    return {"n_train": n_train, "n_eval": n_eval, "image_size": image_size, "seed": seed}


def _is_complete(folder: Path, params: dict) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("params") != params:
        return False
    for split, n in (("train", params["n_train"]), ("eval", params["n_eval"])):
        if not (folder / f"{split}.json").is_file() or not (folder / f"{split}_scenes.json").is_file():
            return False
        img_dir = folder / "images" / split
        if not img_dir.is_dir() or sum(1 for _ in os.scandir(img_dir)) != n:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(root: Path, name: str) -> None:
    """Delete temp folders of generations whose process died (same machine); leave live ones alone."""
    prefix = f".{name}.tmp-"
    for p in root.glob(prefix + "*"):
        try:
            pid = int(p.name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _generate(tmp: Path, final: Path, n_train: int, n_eval: int, image_size: int, seed: int) -> None:
    for split, n, split_id in (("train", n_train, 0), ("eval", n_eval, 1)):
        # Separate streams per split: the eval scenes never depend on n_train and are not train scenes.
        rng = np.random.default_rng([seed, split_id])
        scenes = _sample_split(rng, n, image_size, unique=(split == "eval"))
        cap_rng = np.random.default_rng([seed, split_id, 1])
        img_dir = tmp / "images" / split
        img_dir.mkdir(parents=True)
        entries, meta = [], []
        for i, scene in enumerate(scenes):
            rel = f"images/{split}/{i:06d}.jpg"
            _write_image(scene, str(tmp / rel))
            entries.append({"image": str(final / rel), "caption": _captions(scene, cap_rng)})
            meta.append({
                "image": rel,
                "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "x": round(o.x, 3),
                             "y": round(o.y, 3), "r": round(o.r, 3)} for o in scene.objects],
            })
        (tmp / f"{split}.json").write_text(json.dumps(entries, indent=1) + "\n")
        (tmp / f"{split}_scenes.json").write_text(json.dumps(meta, indent=1) + "\n")
    manifest = {
        "version": GENERATOR_VERSION,
        "params": _params(n_train, n_eval, image_size, seed),
        "counts": {"train": n_train, "eval": n_eval},
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "files": ["train.json", "eval.json", "train_scenes.json", "eval_scenes.json"],
    }
    # Written last: its presence is what marks the folder complete.
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def ensure_scenes(root: str | Path, *, n_train: int = 6000, n_eval: int = 300, image_size: int = 96,
                  seed: int = 0) -> SceneSplits:
    """Generate (or reuse) the scene dataset under root/<a folder name derived from a version string
    and the parameters>.

    A folder is reused only if its manifest (written last) matches GENERATOR_VERSION and the parameters
    and every image is present; anything else is rebuilt from scratch in a temporary sibling folder that
    is renamed into place. Returns the paths of the train and eval JSON files (ALBEF pretrain format).
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train={n_train} and n_eval={n_eval} must be >= 0")
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small for legible shapes (need >= 32)")
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    name = _folder_name(n_train, n_eval, image_size, seed)
    final = root / name
    splits = SceneSplits(train_json=final / "train.json", eval_json=final / "eval.json")
    params = _params(n_train, n_eval, image_size, seed)
    if _is_complete(final, params):
        return splits

    _remove_stale_tmp(root, name)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _generate(tmp, final, n_train, n_eval, image_size, seed)
        if final.exists():
            if _is_complete(final, params):  # a concurrent run finished first
                return splits
            shutil.rmtree(final)  # leftover of an interrupted or tampered generation
        try:
            os.replace(tmp, final)
        except OSError:
            # Lost a race: another process renamed its (identical) copy into place in the meantime.
            if not _is_complete(final, params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return splits
