"""Fidelity and accuracy numbers, numpy only. Every report and benchmark gets them here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = _flat64(a), _flat64(b)
    denom = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    if denom == 0.0:
        return 1.0 if np.array_equal(a64, b64) else 0.0
    return float(np.clip(a64 @ b64 / denom, -1.0, 1.0))


def snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-noise ratio of the candidate against the reference (inf when identical)."""
    ref, cand = _flat64(reference), _flat64(candidate)
    noise = float(np.sum((ref - cand) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(_flat64(a) - _flat64(b))))


def looks_like_class_scores(x: np.ndarray) -> bool:
    """[N, C] float scores with C > 1: top-1 agreement and accuracy make sense on it.

    Rows of unit L2 norm are embeddings (sentence encoders end with an L2 normalisation),
    whose largest coordinate means nothing: int8 MiniLM moved it in 17% of sentences while
    its paraphrase retrieval stayed perfect, and a top-1 gate rolled every pass back."""
    if not (x.ndim == 2 and x.shape[1] > 1 and np.issubdtype(x.dtype, np.floating)):
        return False
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    return not (x.shape[0] > 0 and np.allclose(norms, 1.0, atol=1e-3))


def top1_is_informative(reference: np.ndarray) -> bool:
    """Class scores whose top-1 varies over the samples. Where the reference picks the same
    class for every sample (an untrained net's saturated head, a one-class data set), any
    candidate that keeps that bias agrees 100%: measured on a randomly initialised Inception,
    int8 outputs with a per-sample cosine of 0.06 still agreed on every top-1."""
    if not looks_like_class_scores(reference):
        return False
    return reference.shape[0] < 2 or np.unique(top1(reference)).size > 1


def top1(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).argmax(axis=1)


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.mean(top1(reference) == top1(candidate)))


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(top1(scores) == np.asarray(labels).reshape(-1)))


@dataclass
class OutputFidelity:
    """How closely one output of a candidate follows the reference, on the same inputs."""

    name: str
    cosine: float
    snr_db: float
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None = None
    finite: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def compare_output(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputFidelity:
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"output '{name}' changed shape: {list(ref.shape)} -> {list(cand.shape)}")
    if not np.issubdtype(ref.dtype, np.number) and ref.dtype != np.bool_:
        same = bool(np.array_equal(ref, cand))
        return OutputFidelity(name, float(same), float("inf") if same else 0.0, 0.0 if same else 1.0, 0.0)
    finite = True
    if np.issubdtype(cand.dtype, np.floating):
        # NaN/Inf the reference already had (sqrt of a negative input) are not the candidate's fault.
        ref_ok, cand_ok = np.isfinite(ref), np.isfinite(cand)
        finite = bool(np.all(cand_ok | ~ref_ok))
        both = ref_ok & cand_ok
        ref, cand = (ref[both], cand[both]) if not both.all() else (ref, cand)
    scale = float(np.max(np.abs(_flat64(ref)))) if ref.size else 0.0
    err = max_abs_error(ref, cand)
    return OutputFidelity(
        name=name,
        cosine=cosine(ref, cand),
        snr_db=snr_db(ref, cand),
        max_abs_error=err,
        max_rel_error=err / scale if scale > 0 else (0.0 if err == 0 else float("inf")),
        top1_agreement=top1_agreement(reference, candidate) if top1_is_informative(reference) else None,
        finite=finite,
    )


def compare_outputs(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]
) -> list[OutputFidelity]:
    missing = [n for n in reference if n not in candidate]
    if missing:
        raise ValueError(f"candidate lacks output(s): {', '.join(missing)}")
    return [compare_output(n, reference[n], candidate[n]) for n in reference]


def task_accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray | None) -> float | None:
    """Top-1 accuracy of the first output that looks like class scores, when labels exist."""
    if labels is None:
        return None
    for out in outputs.values():
        if looks_like_class_scores(out) and out.shape[0] == len(labels):
            return accuracy(out, labels)
    return None


def _flat64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).ravel()
