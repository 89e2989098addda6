"""Silero VAD from the `silero-vad` wheel: speech-frame agreement with the fp32 model.

Audio is synthesised offline with Debian's espeak-ng (installed with apt-get at set-up when
missing): English sentences in several voices, separated by pauses, over a seeded noise
floor with a burst of louder noise, at 16 kHz. The model is stateful: it is run chunk by
chunk (512 new samples plus 64 of context, as the wheel's own wrapper does), carrying its
`state` output into the next call.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.io import wavfile
from scipy.signal import resample_poly

from benchmarks.fetch import wheel_member
from benchmarks.subject import Feed, Score, SetupContext, Subject, save_feeds

REQUIREMENT = "silero-vad==6.2.3"
MEMBER = "silero_vad/data/silero_vad.onnx"
RATE = 16000
CHUNK = 512
CONTEXT = 64
SPEECH = 0.5  # probability above which a frame counts as speech
CALIB_STRIDE = 4  # keep every 4th chunk's feed for calibration

EVAL_SPEECH = (
    ("en-us", "The weather today is cloudy with a chance of rain in the afternoon."),
    ("en-gb", "Please remember to switch off the lights when you leave the room."),
    ("en-us+f3", "Seven hundred and forty two people attended the concert last night."),
    ("en-gb-scotland", "A small boat drifted slowly across the quiet lake at sunrise."),
    ("en-us+m3", "Could you send me the report before the meeting on Thursday?"),
    ("en-gb-x-rp", "Fresh bread and warm soup make a simple but satisfying dinner."),
)
CALIB_SPEECH = (
    ("en-us", "The train to the city leaves from platform nine every hour."),
    ("en-gb+f2", "Mathematics is the language in which the universe is written."),
    ("en-us+m2", "She planted tomatoes, beans and sunflowers in the garden."),
    ("en-gb-x-rp", "Our computers were upgraded over the long weekend."),
)


def build(name: str, ctx: SetupContext) -> Subject:
    model = wheel_member(ctx.cache, REQUIREMENT, MEMBER)
    speech = EVAL_SPEECH[:2] if ctx.quick else EVAL_SPEECH
    eval_clip = _clip(ctx.cache, speech, seed=ctx.seed + 1)
    calib_clip = _clip(ctx.cache, CALIB_SPEECH[:2] if ctx.quick else CALIB_SPEECH, seed=ctx.seed + 2)
    calib_feeds = _recorded_feeds(model, calib_clip)[::CALIB_STRIDE]
    feeds = save_feeds(ctx.work / "calibration_feeds.npz", calib_feeds)
    calibration = _project_layout(ctx.work / "calibration.npz", calib_feeds)
    return Subject(
        name=name,
        family="pretrained",
        model_path=model,
        feeds=feeds,
        calibration=calibration,
        predict=lambda session: speech_probabilities(session, eval_clip),
        score=frame_agreement,
        metric="speech-frame agreement vs fp32",
        metric_kind="fidelity",
        latency_feed=calib_feeds[len(calib_feeds) // 2],
        input_shapes={"input": [1, CHUNK + CONTEXT], "state": [2, 1, 128]},
        latency_runs=50 if ctx.quick else 500,
        setup={
            "model": f"{MEMBER} from pip wheel {REQUIREMENT}",
            "evaluation": f"{len(eval_clip) / RATE:.1f} s clip ({len(eval_clip) // CHUNK} frames of 32 ms), "
            "espeak-ng: " + " | ".join(f"[{v}] {t}" for v, t in speech),
            "calibration": f"{len(calib_feeds)} recorded feeds (every {CALIB_STRIDE}th chunk) of a "
            f"{len(calib_clip) / RATE:.1f} s clip with other sentences and voices",
            "metric": f"frames with speech probability > {SPEECH}; share of frames where the variant "
            "agrees with fp32",
        },
    )


def _project_layout(path: Path, feeds: list[Feed]) -> Path:
    """The calibration set as a user would write it for `--data`: the recorded feeds, whole.

    silero's `state` is [2, batch, 128] (batch on axis 1) beside `input` [batch, 576] and a
    scalar `sr`: no axis is the batch of every input, so the feeds are stacked as they are
    (the data layout's "whole feeds": [N, *model shape] per input).
    """
    np.savez(
        path,
        input=np.stack([f["input"] for f in feeds]),  # [N, 1, 576]
        state=np.stack([f["state"] for f in feeds]),  # [N, 2, 1, 128]
        sr=np.stack([f["sr"] for f in feeds]),  # [N]
    )
    return path


# ----- audio ----------------------------------------------------------------------------------------


def _clip(cache: Path, sentences, seed: int) -> np.ndarray:
    """Sentences with pauses, a noise burst and a noise floor; cached by content."""
    key = hashlib.sha256(repr((sentences, seed)).encode()).hexdigest()[:16]
    path = cache / "vad" / f"clip_{key}.npy"
    if path.is_file():
        return np.load(path)
    rng = np.random.default_rng(seed)
    pause = np.zeros(int(0.8 * RATE), np.float32)
    parts = [np.zeros(int(0.5 * RATE), np.float32)]
    for i, (voice, text) in enumerate(sentences):
        parts += [_speak(voice, text), pause]
        if i == len(sentences) // 2:  # loud non-speech: a VAD must not call this speech
            parts += [rng.normal(0, 0.05, int(0.7 * RATE)).astype(np.float32), pause]
    clip = np.concatenate(parts)
    clip += rng.normal(0, 0.003, clip.shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, clip.astype(np.float32))
    return np.load(path)


def _speak(voice: str, text: str) -> np.ndarray:
    _ensure_espeak()
    with tempfile.TemporaryDirectory(prefix="bench-tts-") as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, capture_output=True)
        rate, samples = wavfile.read(wav)
    audio = samples.astype(np.float32) / 32768.0
    return resample_poly(audio, RATE, rate).astype(np.float32) * 0.8


def _ensure_espeak() -> None:
    if shutil.which("espeak-ng"):
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError("espeak-ng is not installed and apt-get is not available")
    install = ["apt-get", "install", "-y", "-q", "espeak-ng"]
    if subprocess.run(install, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True)
        subprocess.run(install, capture_output=True, check=True)


# ----- running the stateful model ---------------------------------------------------------------------


def _chunks(clip: np.ndarray):
    """(feed input, chunk index) with the 64 previous samples prepended, as silero's wrapper does."""
    context = np.zeros(CONTEXT, np.float32)
    for start in range(0, len(clip) - CHUNK + 1, CHUNK):
        chunk = clip[start : start + CHUNK]
        yield np.concatenate([context, chunk])[None].astype(np.float32)
        context = chunk[-CONTEXT:]


def _initial_state() -> np.ndarray:
    return np.zeros((2, 1, 128), np.float32)


def speech_probabilities(session: ort.InferenceSession, clip: np.ndarray) -> np.ndarray:
    state = _initial_state()
    sr = np.array(RATE, dtype=np.int64)
    probs = []
    for x in _chunks(clip):
        prob, state = session.run(None, {"input": x, "state": state, "sr": sr})
        probs.append(float(np.asarray(prob).ravel()[0]))
    return np.array(probs)


def _recorded_feeds(model: Path, clip: np.ndarray) -> list[Feed]:
    """The exact feeds the fp32 model sees on `clip`, its own states included."""
    from onnxslim_tool import runtime

    session = runtime.make_session(model)
    state, sr, feeds = _initial_state(), np.array(RATE, dtype=np.int64), []
    for x in _chunks(clip):
        feed = {"input": x, "state": state, "sr": sr}
        feeds.append(feed)
        state = session.run(None, feed)[1]
    return feeds


def frame_agreement(reference: np.ndarray, candidate: np.ndarray) -> Score:
    ref_speech, cand_speech = reference > SPEECH, candidate > SPEECH
    return Score(
        float(np.mean(ref_speech == cand_speech)),
        {
            "prob_mean_abs_error": float(np.mean(np.abs(reference - candidate))),
            "speech_share": float(np.mean(cand_speech)),
            "fp32_speech_share": float(np.mean(ref_speech)),
        },
    )
