"""Tests for the synthetic scene dataset (albef_fast.data.scenes).

Captions are checked against the geometry with an independent little parser: it finds "NP <relation>
NP" phrases, resolves each noun phrase to the objects it names, and checks the relation on the stored
object centres. The images are checked against the same metadata by sampling pixel colours.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef_fast.data import scenes
from albef_fast.data.scenes import COLOURS, SHAPES, SceneSplits, ensure_scenes

N_TRAIN, N_EVAL, SIZE = 40, 10, 96

SIZE_WORD = {"large": "large", "big": "large", "small": "small", "little": "small", "tiny": "small"}
COUNT_WORD = {"two": 2, "three": 3}
_NP = (r"(?:(?P<det{i}>a|an|the|two|three)\s+)?(?:(?P<size{i}>large|big|small|little|tiny)\s+)?"
       r"(?:(?P<colour{i}>" + "|".join(COLOURS) + r")\s+)?"
       r"(?P<shape{i}>" + "|".join(SHAPES) + r")(?P<pl{i}>es|s)?\b")
_REL = (r"\s+(?:(?:is|are)\s+)?(?:(?:to|on)\s+the\s+)?"
        r"(?P<rel>left of|right of|above|over|below|under|beneath)\s+")
REL_RE = re.compile(_NP.format(i=1) + _REL + _NP.format(i=2))
WITH_IT_RE = re.compile("^" + _NP.format(i=1) + r" with " + _NP.format(i=2) + _REL + r"(?:it|them)$")
NP_RE = re.compile(_NP.format(i=1))
REL_CANON = {"left of": "left", "right of": "right", "above": "above", "over": "above", "below": "below",
             "under": "below", "beneath": "below"}


def clean(caption: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[,.:;]", " ", caption.lower())).strip()


def resolve(m: re.Match, i: int, objs: list[dict]) -> list[dict]:
    """Objects named by noun phrase i of a match; asserts the phrase is unambiguous and present."""
    shape, colour, size = m[f"shape{i}"], m[f"colour{i}"], m[f"size{i}"]
    cands = [o for o in objs if o["shape"] == shape and (colour is None or o["colour"] == colour)
             and (size is None or o["size"] == SIZE_WORD[size])]
    det, plural = m[f"det{i}"], m[f"pl{i}"] is not None
    if not plural:
        assert len(cands) == 1, f"{m[0]!r}: singular phrase matches {len(cands)} objects in {objs}"
    elif det in COUNT_WORD:
        assert len(cands) == COUNT_WORD[det], f"{m[0]!r}: count mismatch in {objs}"
    else:
        assert len(cands) >= 2, f"{m[0]!r}: plural phrase matches {len(cands)} objects"
    return cands


def holds(rel: str, a: dict, b: dict, image_size: int) -> bool:
    """a <rel> b with a clear margin; image y grows downwards."""
    m = 0.1 * image_size
    return {"left": b["x"] - a["x"], "right": a["x"] - b["x"], "above": b["y"] - a["y"],
            "below": a["y"] - b["y"]}[rel] >= m


def check_caption(caption: str, objs: list[dict], image_size: int, stats: Counter) -> None:
    """Assert everything the caption claims about layout is true of `objs`; count what was checked."""
    text = clean(caption)
    # Every caption names every object: its colours and shapes are exactly the scene's.
    words = set(text.split())
    assert {c for c in COLOURS if c in words} == {o["colour"] for o in objs}, (caption, objs)
    named = {s for s in SHAPES if s in words or scenes._PLURAL[s] in words}
    assert named == {o["shape"] for o in objs}, (caption, objs)

    m = WITH_IT_RE.match(text)
    if m:  # "NP1 with NP2 <rel> it": NP2 is the subject, NP1 the reference
        subj, ref = resolve(m, 2, objs), resolve(m, 1, objs)
        rel = REL_CANON[m["rel"]]
        assert all(holds(rel, a, b, image_size) for a in subj for b in ref), (caption, objs)
        stats["with_it"] += 1
    else:
        for m in REL_RE.finditer(text):
            subj, ref = resolve(m, 1, objs), resolve(m, 2, objs)
            rel = REL_CANON[m["rel"]]
            assert all(holds(rel, a, b, image_size) for a in subj for b in ref), (caption, objs)
            stats["relation"] += 1

    for prefix, key in (("from left to right ", "x"), ("from top to bottom ", "y")):
        if text.startswith(prefix):
            seq = [resolve(m, 1, objs)[0] for m in NP_RE.finditer(text[len(prefix):])]
            assert len(seq) == len(objs) == 3
            gaps = [q[key] - p[key] for p, q in itertools.pairwise(seq)]
            assert all(gap >= 0.1 * image_size for gap in gaps), (caption, objs)
            stats["order_" + key] += 1

    if "side by side" in text or "next to each other" in text or "the other" in text:
        assert len(objs) == 2 and objs[0]["shape"] == objs[1]["shape"]
        dx, dy = abs(objs[0]["x"] - objs[1]["x"]), abs(objs[0]["y"] - objs[1]["y"])
        assert (dy > dx) if "the other" in text else (dx > dy), (caption, objs)
        stats["pair"] += 1

    if len(objs) == 1:
        (o,) = objs
        third = image_size / 3
        col = "left" if o["x"] < third else "right" if o["x"] > 2 * third else "middle"
        row = "top" if o["y"] < third else "bottom" if o["y"] > 2 * third else "middle"
        said_row = "top" if words & {"top", "upper"} else "bottom" if words & {"bottom", "lower"} else None
        said_col = "left" if "left" in words else "right" if "right" in words else None
        if words & {"middle", "centre", "center"}:
            assert (row, col) == ("middle", "middle"), (caption, o)
            stats["region"] += 1
        elif said_row or said_col:
            assert said_row in (row, None) and said_col in (col, None), (caption, o)
            # A region phrase names every off-centre coordinate ("top left", not just "top").
            assert (said_row or "middle") == row and (said_col or "middle") == col, (caption, o)
            stats["region"] += 1


def load(path: Path) -> list:
    return json.loads(path.read_text())


def meta_of(splits: SceneSplits, split: str) -> list[dict]:
    return load(splits.train_json.parent / f"{split}_scenes.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SceneSplits:
    root = tmp_path_factory.mktemp("scenes")
    return ensure_scenes(root, n_train=N_TRAIN, n_eval=N_EVAL, image_size=SIZE, seed=3)


def test_albef_json_format(data: SceneSplits) -> None:
    for path, n in ((data.train_json, N_TRAIN), (data.eval_json, N_EVAL)):
        entries = load(path)
        assert isinstance(entries, list) and len(entries) == n
        for e in entries:
            assert set(e) == {"image", "caption"}
            assert Path(e["image"]).is_absolute() and Path(e["image"]).is_file()
            assert isinstance(e["caption"], list) and 3 <= len(e["caption"]) <= 5
            assert all(isinstance(c, str) and c.strip() for c in e["caption"])
            assert len(set(e["caption"])) == len(e["caption"]), "captions of an image must differ"
            assert all(len(c.split()) <= 20 for c in e["caption"])
        assert len({e["image"] for e in entries}) == n
    train_imgs = {e["image"] for e in load(data.train_json)}
    assert not train_imgs & {e["image"] for e in load(data.eval_json)}


def test_images_match_metadata(data: SceneSplits) -> None:
    palette = {name: np.array(rgb, dtype=float) for name, rgb in COLOURS.items()}
    for split, path in (("train", data.train_json), ("eval", data.eval_json)):
        entries, meta = load(path), meta_of(data, split)
        assert len(entries) == len(meta)
        for e, m in zip(entries, meta):
            assert e["image"].endswith(m["image"])
            with Image.open(e["image"]) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
                px = np.asarray(im, dtype=float)
            assert 1 <= len(m["objects"]) <= 3
            for o in m["objects"]:
                # Every shape is filled at its centre, and objects never overlap: the centre pixel
                # must be (nearest to) the object's colour.
                rgb = px[round(o["y"]), round(o["x"])]
                nearest = min(palette, key=lambda c: np.sum((palette[c] - rgb) ** 2))
                assert nearest == o["colour"], (e["image"], o, rgb)
                # Size: count object-coloured pixels inside its (exclusive) bounding box. Any large
                # shape covers >= ~0.05 S^2 pixels, any small one <= ~0.035 S^2.
                x0, x1 = int(o["x"] - o["r"]), int(o["x"] + o["r"]) + 1
                y0, y1 = int(o["y"] - o["r"]), int(o["y"] + o["r"]) + 1
                box = px[max(y0, 0):y1, max(x0, 0):x1]
                area = np.sum(np.sum((box - palette[o["colour"]]) ** 2, axis=-1) < 60**2)
                assert (area > 0.045 * SIZE**2) == (o["size"] == "large"), (e["image"], o, area)
            corner = px[0, 0]
            assert np.max(corner) < 120, "background should be a dark grey"


def test_captions_are_true(data: SceneSplits) -> None:
    stats: Counter = Counter()
    for split, path in (("train", data.train_json), ("eval", data.eval_json)):
        for e, m in zip(load(path), meta_of(data, split)):
            for c in e["caption"]:
                check_caption(c, m["objects"], SIZE, stats)
    assert stats["relation"] > 0


def test_relations_geometrically_true_many_scenes() -> None:
    """Sample far more scenes than are cheap to draw and check every caption against the geometry."""
    rng = np.random.default_rng(123)
    stats: Counter = Counter()
    for image_size in (64, 96):
        for _ in range(600):
            scene = scenes._sample_scene(rng, image_size)
            objs = [{"shape": o.shape, "colour": o.colour, "size": o.size, "x": o.x, "y": o.y}
                    for o in scene.objects]
            for c in scenes._captions(scene, rng):
                check_caption(c, objs, image_size, stats)
    # The parser must actually have checked each kind of claim many times (guards against a vacuous pass).
    assert stats["relation"] > 500, stats
    assert stats["with_it"] > 30 and stats["region"] > 100 and stats["pair"] > 5, stats
    assert stats["order_x"] > 15 and stats["order_y"] > 15, stats


def test_parser_rejects_false_relation() -> None:
    """The checker itself must be able to fail: a flipped relation is caught."""
    objs = [{"shape": "circle", "colour": "red", "size": "large", "x": 20.0, "y": 48.0},
            {"shape": "square", "colour": "blue", "size": "small", "x": 76.0, "y": 48.0}]
    check_caption("a big red circle to the left of a tiny blue square", objs, 96, Counter())
    with pytest.raises(AssertionError):
        check_caption("a big red circle to the right of a tiny blue square", objs, 96, Counter())
    with pytest.raises(AssertionError):
        check_caption("a big red circle above a tiny blue square", objs, 96, Counter())


def test_deterministic(data: SceneSplits, tmp_path: Path) -> None:
    again = ensure_scenes(tmp_path / "other", n_train=N_TRAIN, n_eval=N_EVAL, image_size=SIZE, seed=3)
    assert again.train_json != data.train_json
    for a_path, b_path in ((data.train_json, again.train_json), (data.eval_json, again.eval_json)):
        a, b = load(a_path), load(b_path)
        assert [e["caption"] for e in a] == [e["caption"] for e in b]
        for ea, eb in zip(a, b):
            rel_a = Path(ea["image"]).relative_to(a_path.parent)
            assert rel_a == Path(eb["image"]).relative_to(b_path.parent)
            assert Path(ea["image"]).read_bytes() == Path(eb["image"]).read_bytes()
    # JSON is byte-identical once the root prefix is accounted for.
    root_a, root_b = str(data.train_json.parent), str(again.train_json.parent)
    assert data.train_json.read_text().replace(root_a, "") == again.train_json.read_text().replace(root_b, "")

    other_seed = ensure_scenes(tmp_path / "other", n_train=N_TRAIN, n_eval=N_EVAL, image_size=SIZE, seed=4)
    captions = [e["caption"] for e in load(data.train_json)]
    assert [e["caption"] for e in load(other_seed.train_json)] != captions


def test_eval_independent_of_n_train(data: SceneSplits, tmp_path: Path) -> None:
    """Eval scenes come from their own RNG stream: changing the train size leaves them untouched."""
    other = ensure_scenes(tmp_path, n_train=N_TRAIN + 7, n_eval=N_EVAL, image_size=SIZE, seed=3)
    assert [e["caption"] for e in load(other.eval_json)] == [e["caption"] for e in load(data.eval_json)]
    train_caps = {c for e in load(data.train_json) for c in e["caption"]}
    eval_caps = [c for e in load(data.eval_json) for c in e["caption"]]
    assert sum(c in train_caps for c in eval_caps) < len(eval_caps) / 4
    # Separate streams: no eval scene repeats a train scene's exact geometry.
    layout = lambda m: tuple((o["x"], o["y"], o["r"]) for o in m["objects"])
    train_layouts = {layout(m) for m in meta_of(data, "train")}
    assert not any(layout(m) in train_layouts for m in meta_of(data, "eval"))


def test_reuse_does_not_regenerate(data: SceneSplits, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = data.train_json.parent
    manifest = folder / "manifest.json"
    before = (manifest.stat().st_mtime_ns, data.train_json.stat().st_mtime_ns)

    def boom(*args, **kwargs):
        raise AssertionError("a complete dataset must be reused, not regenerated")

    monkeypatch.setattr(scenes, "_generate", boom)
    again = ensure_scenes(folder.parent, n_train=N_TRAIN, n_eval=N_EVAL, image_size=SIZE, seed=3)
    assert again == data
    assert (manifest.stat().st_mtime_ns, data.train_json.stat().st_mtime_ns) == before
    assert json.loads(manifest.read_text())["version"] == scenes.GENERATOR_VERSION


def _siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("damage", ["no_manifest", "corrupt_manifest", "old_version", "missing_image"])
def test_incomplete_folder_is_regenerated(tmp_path: Path, damage: str) -> None:
    splits = ensure_scenes(tmp_path, n_train=6, n_eval=4, image_size=64)
    folder = splits.train_json.parent
    good = splits.eval_json.read_bytes()
    if damage == "no_manifest":
        (folder / "manifest.json").unlink()
    elif damage == "corrupt_manifest":
        (folder / "manifest.json").write_text('{"version": ')
    elif damage == "old_version":
        manifest = load(folder / "manifest.json")
        (folder / "manifest.json").write_text(json.dumps({**manifest, "version": "scenes-v0"}))
    else:
        (folder / "images" / "train" / "000003.jpg").unlink()
    (folder / "junk.txt").write_text("left over by an interrupted run")

    again = ensure_scenes(tmp_path, n_train=6, n_eval=4, image_size=64)
    assert again == splits
    assert not (folder / "junk.txt").exists(), "an incomplete folder must be rebuilt, not patched"
    assert (folder / "manifest.json").is_file() and (folder / "images" / "train" / "000003.jpg").is_file()
    assert splits.eval_json.read_bytes() == good
    assert _siblings(tmp_path) == [folder.name]


def test_interrupted_generation_leaves_nothing_reusable(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = scenes._write_image
    calls = {"n": 0}

    def failing(scene, path):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated interruption")
        real(scene, path)

    monkeypatch.setattr(scenes, "_write_image", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_scenes(tmp_path, n_train=8, n_eval=4, image_size=64)
    assert _siblings(tmp_path) == [], "neither a final folder nor a temp folder may survive"

    monkeypatch.setattr(scenes, "_write_image", real)
    splits = ensure_scenes(tmp_path, n_train=8, n_eval=4, image_size=64)
    assert len(load(splits.train_json)) == 8 and (splits.train_json.parent / "manifest.json").is_file()


def test_stale_temp_folder_of_dead_process_is_ignored_and_removed(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import os; print(os.getpid())"]
    dead = subprocess.run(cmd, capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    name = scenes._folder_name(6, 4, 64, 0)
    stale = tmp_path / f".{name}.tmp-{pid}-deadbeef"
    (stale / "images").mkdir(parents=True)
    # Even a manifest inside a temp folder does not make it a dataset.
    (stale / "manifest.json").write_text(json.dumps({"version": scenes.GENERATOR_VERSION}))
    splits = ensure_scenes(tmp_path, n_train=6, n_eval=4, image_size=64)
    assert splits.train_json.parent == tmp_path / name
    assert splits.train_json.is_file()
    if not scenes._pid_alive(pid):  # pid reuse is possible, if very unlikely
        assert not stale.exists()


def _signature(objs: list[dict], image_size: int) -> tuple:
    attrs = tuple(sorted((o["shape"], o["colour"], o["size"]) for o in objs))
    if len(objs) == 1:
        o = objs[0]
        return attrs, (int(3 * o["y"] / image_size), int(3 * o["x"] / image_size))
    rels = []
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            dx, dy = b["x"] - a["x"], b["y"] - a["y"]
            first, second = (a, b) if (dx if abs(dx) >= abs(dy) else dy) > 0 else (b, a)
            axis = "h" if abs(dx) >= abs(dy) else "v"
            rels.append((axis, tuple(first.values())[:3], tuple(second.values())[:3]))
    return attrs, tuple(sorted(rels))


def test_eval_signatures_unique(tmp_path: Path) -> None:
    splits = ensure_scenes(tmp_path, n_train=0, n_eval=300, image_size=64, seed=1)
    meta = meta_of(splits, "eval")
    assert len(meta) == 300 and load(splits.train_json) == []
    sigs = [_signature(m["objects"], 64) for m in meta]
    assert len(set(sigs)) == len(sigs)
    # Stronger: at this size even the attribute multisets are unique, so every caption (which names
    # all objects with all attributes) points at exactly one eval image.
    assert len({s[0] for s in sigs}) == len(sigs)
    caps = [c for e in load(splits.eval_json) for c in e["caption"]]
    assert len(set(caps)) == len(caps)
    # The count mix is not destroyed by the resampling.
    counts = Counter(len(m["objects"]) for m in meta)
    assert all(counts[k] >= 30 for k in (1, 2, 3)), counts


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ensure_scenes(tmp_path, image_size=16)
    with pytest.raises(ValueError):
        ensure_scenes(tmp_path, n_train=-1)
    assert not any(tmp_path.iterdir()) or _siblings(tmp_path) == []
