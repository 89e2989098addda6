"""Export all-MiniLM-L6-v2 to ONNX (run as a child process: it imports torch and transformers).

Usage: python -m benchmarks.subjects.minilm_export MODEL_DIR OUT.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

MAX_ERROR = 1e-4  # the export must reproduce torch's embeddings


def export(model_dir: Path, target: Path) -> None:
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    wrapper = _sentence_embedding(AutoModel.from_pretrained(str(model_dir)).eval())
    sample = tokenizer(
        ["An example sentence.", "Another, slightly longer example sentence for tracing."],
        padding="max_length",
        max_length=32,
        truncation=True,
        return_tensors="pt",
    )
    args = (sample["input_ids"], sample["attention_mask"], sample["token_type_ids"])
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
    dims = {0: batch, 1: sequence}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.onnx")
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            args,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["sentence_embedding"],
            dynamic_shapes=(dims, dims, dims),
            opset_version=18,
            dynamo=True,
        )
        program.save(str(partial))
        check = tokenizer(
            ["The check uses other sentences.", "Short one."],
            padding="max_length",
            max_length=24,
            return_tensors="pt",
        )
        expected = wrapper(**check).numpy()
    session = ort.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in check.items()})[0]
    error = float(np.max(np.abs(got - expected)))
    if error > MAX_ERROR:
        raise SystemExit(f"exported model differs from torch by {error:.3g}")
    partial.replace(target)


def _sentence_embedding(model):
    import torch

    class SentenceEmbedding(torch.nn.Module):
        """BERT, then mean pooling over real tokens and L2 normalisation (sentence-transformers)."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    return SentenceEmbedding()


if __name__ == "__main__":
    export(Path(sys.argv[1]), Path(sys.argv[2]))
