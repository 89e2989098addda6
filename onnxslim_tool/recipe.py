"""Recipes: which passes run, in which order, with which parameters.

A recipe is plain data (YAML/JSON/dict), validated against the pass constructors so a
typo gets an error naming the bad key and the allowed ones. The CLI's method flags build
the same object, so a flag run and a recipe run are one code path.
"""

from __future__ import annotations

import difflib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxslim_tool import task_metrics
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.passes import available, pass_class
from onnxslim_tool.passes.base import CompressionPass

RECIPE_KEYS = ("passes", "max_drop", "seed", "name", "task_metric")


class RecipeError(OnnxSlimError):
    """A recipe names an unknown pass or parameter, or a value of the wrong kind."""


@dataclass
class Step:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, **self.params}


@dataclass
class Recipe:
    steps: list[Step]
    max_drop: float | None = None
    seed: int = 0
    name: str = "custom"
    # What the budget judges ("detection-f1", "module:function"); None: labels or fidelity.
    task_metric: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str = "custom") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError("a recipe is a mapping with a 'passes' list")
        unknown = set(data) - set(RECIPE_KEYS)
        if unknown:
            raise RecipeError(f"unknown recipe key '{sorted(unknown)[0]}'; allowed: {', '.join(RECIPE_KEYS)}")
        raw_steps = data.get("passes")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise RecipeError("recipe needs a non-empty 'passes' list")
        steps = []
        for i, raw in enumerate(raw_steps):
            if isinstance(raw, str):
                raw = {"pass": raw}
            if isinstance(raw, dict) and "pass" not in raw and "name" in raw:
                raw = {"pass": raw["name"], **{k: v for k, v in raw.items() if k != "name"}}
            if not isinstance(raw, dict) or "pass" not in raw:
                raise RecipeError(f"passes[{i}] must be a pass name or a mapping with a 'pass' key")
            params = {k: v for k, v in raw.items() if k != "pass"}
            steps.append(Step(canonical_pass_name(raw["pass"]), params))
        metric = data.get("task_metric")
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise RecipeError(
                f"task_metric must be a built-in name ({', '.join(task_metrics.BUILTIN)}) or "
                f"'package.module:function', got {metric!r}"
            )
        recipe = cls(
            steps, data.get("max_drop"), int(data.get("seed", 0)), str(data.get("name", name)), metric
        )
        recipe.validate()
        return recipe

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:
            raise RecipeError(f"cannot parse recipe {path}: {' '.join(str(exc).split())[:200]}") from exc
        return cls.from_dict(data, name=path.stem)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "max_drop": self.max_drop,
            "passes": [s.to_dict() for s in self.steps],
            **({"task_metric": self.task_metric} if self.task_metric is not None else {}),
        }

    def validate(self) -> None:
        if self.task_metric is not None:
            try:  # an unknown name or a failed import fails here, before any data is read
                task_metrics.load_task_metric(self.task_metric)
            except OnnxSlimError as exc:
                raise RecipeError(f"recipe task_metric: {exc}") from None
        for step in self.steps:
            allowed = _constructor_params(step.name)
            for key in step.params:
                if key not in allowed:
                    raise RecipeError(
                        f"pass '{step.name}' has no parameter '{key}'{_did_you_mean(key, allowed)}; "
                        f"allowed: {', '.join(sorted(allowed))}"
                    )

    def build(self) -> list[CompressionPass]:
        """Construct the passes; a constructor's own refusal keeps its one-line message."""
        passes = []
        for step in self.steps:
            cls = pass_class(step.name)
            params = dict(step.params)
            accepted = _constructor_params(step.name)
            if "seed" in accepted:
                params.setdefault("seed", self.seed)
            if "max_drop" in accepted and self.max_drop is not None:
                # A pass with its own budget search (quantize's mixed precision) gets the
                # recipe's, so it keeps layers in float up front rather than after a back-off.
                params.setdefault("max_drop", self.max_drop)
            try:
                passes.append(cls(**params))
            except OnnxSlimError:
                raise
            except (TypeError, ValueError) as exc:
                raise RecipeError(f"pass '{step.name}': {exc}") from exc
        return passes


# The CLI's flag names and other spellings users write for a pass.
_PASS_ALIASES = {
    "prune-channels": "channel-pruning",
    "prune-weights": "weight-pruning",
    "share-weights": "weight-sharing",
    "share": "weight-sharing",
    "drop-blocks": "block-dropping",
    "merge-layers": "layer-merging",
    "low-rank": "lowrank",
    "quantization": "quantize",
}


def canonical_pass_name(name: Any) -> str:
    """A pass name as registered: case and '_' vs '-' do not matter, CLI flag names work."""
    text = str(name).strip().lower().replace("_", "-")
    return _PASS_ALIASES.get(text, text)


def _did_you_mean(word: str, choices: set[str] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _did_you_mean_pass(name: str) -> str:
    close = difflib.get_close_matches(name, [*available(), *_PASS_ALIASES], n=1)
    return f" (did you mean '{_PASS_ALIASES.get(close[0], close[0])}'?)" if close else ""


def _constructor_params(name: str) -> set[str]:
    try:
        cls = pass_class(name)
    except KeyError:
        raise RecipeError(
            f"unknown pass '{name}'{_did_you_mean_pass(name)}; available: {', '.join(available())}"
        ) from None
    except ImportError as exc:
        raise RecipeError(f"pass '{name}' is not available in this installation: {exc}") from exc
    params: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.add(p.name)
    return params


def recipe_from_flags(
    *,
    prune_channels: float | None = None,
    target_macs: float | None = None,
    criterion: str | None = None,
    reconstruct: bool = True,
    round_to: int | None = None,
    layer_ratios: dict[str, float] | None = None,
    prune_ends: bool = False,
    drop_blocks: int | None = None,
    drop_blocks_macs: float | None = None,
    merge_layers: bool = False,
    prune_weights: float | None = None,
    lowrank: float | None = None,
    energy: float | None = None,
    lowrank_method: str | None = None,
    lowrank_rank: str | None = None,
    share_bits: int | None = None,
    share_method: str | None = None,
    quantize: str | None = None,
    calibrator: str | None = None,
    speed_guard: bool = False,
    max_drop: float | None = None,
    exclude: list[str] | None = None,
    seed: int = 0,
) -> Recipe:
    """The recipe the CLI's method flags describe, in the order that composes best.

    Whole blocks go first (no point pruning channels of a block about to be dropped).
    Channel pruning runs before BatchNorm folding (bn_gamma reads the BN scales; slicing a
    BN is as easy as slicing a bias); exact layer merges follow the pruning, on folded
    weights; low-rank after them (the folded weights are the ones to factorize), then
    weight pruning, sharing, and quantization last.
    """
    if quantize is None and (calibrator or speed_guard):
        given = "--calibrator" if calibrator else "--speed-guard"
        raise RecipeError(f"{given} applies to quantization: add --quantize MODE")
    common: dict[str, Any] = {"exclude": list(exclude)} if exclude else {}
    steps: list[Step] = []
    pruning_channels = prune_channels is not None or target_macs is not None or bool(layer_ratios)
    steps.append(Step("cleanup", {"fold_batchnorm": not pruning_channels, **common}))
    if drop_blocks is not None or drop_blocks_macs is not None:
        params = {"drop_blocks": drop_blocks, "target_macs": drop_blocks_macs, **common}
        steps.append(Step("block-dropping", {k: v for k, v in params.items() if v is not None}))
    if pruning_channels:
        params: dict[str, Any] = {"reconstruct": reconstruct, **common}
        if prune_channels is not None:
            params["ratio"] = prune_channels
        elif target_macs is None:
            params["ratio"] = 0.0  # only the layers named by --layer-ratio
        if target_macs is not None:
            params["target_macs"] = target_macs
        if criterion:
            params["criterion"] = criterion
        if round_to:
            params["round_to"] = round_to
        if layer_ratios:
            params["per_layer"] = dict(layer_ratios)
        if prune_ends:
            params["protect_ends"] = False
        steps += [Step("channel-pruning", params), Step("cleanup", dict(common))]
    if merge_layers:
        steps.append(Step("layer-merging", dict(common)))
    if lowrank is not None or energy is not None or lowrank_rank is not None:
        params = {"ratio": lowrank, "energy": energy, **common}
        if lowrank_method:
            params["method"] = lowrank_method
        if lowrank_rank:
            params["rank_rule"] = lowrank_rank
        steps.append(Step("lowrank", params))
    if prune_weights is not None:
        steps.append(Step("weight-pruning", {"sparsity": prune_weights, **common}))
    if share_bits is not None or share_method:
        # --share-method alone means sharing with that method at its default width.
        params = {**({"bits": share_bits} if share_bits is not None else {}), **common}
        if share_method:
            params["method"] = share_method
        steps.append(Step("weight-sharing", params))
    if quantize is not None:
        params = {"mode": quantize, **common}
        if calibrator:
            params["calibrator"] = calibrator
        if speed_guard:
            params["speed_guard"] = True
        if max_drop is not None:
            params["max_drop"] = max_drop
        steps.append(Step("quantize", params))
    recipe = Recipe(steps, max_drop=max_drop, seed=seed, name="flags")
    return recipe


# Built-in recipes: starting points that compose the passes sensibly. The lossy ones run under a
# 1-point budget by default; the gate backs off whatever breaks it.
BUILTIN: dict[str, dict[str, Any]] = {
    "lossless": {
        "description": "cleanup only: folding, dead code, duplicate weights; outputs unchanged",
        "passes": ["cleanup"],
    },
    "safe": {
        "description": "default with data: light structured pruning with refit, then int8 weights "
        "(4x smaller weights, float compute); 1-point budget",
        "max_drop": 0.01,
        "passes": [
            {"pass": "cleanup", "fold_batchnorm": False},
            {"pass": "channel-pruning", "ratio": 0.2, "criterion": "thinet", "round_to": 8},
            "cleanup",
            {"pass": "quantize", "mode": "int8-weights"},
        ],
    },
    "fast": {
        "description": "speed: structured pruning with refit (channels rounded to 8), then static int8 "
        "(int8-weights where the probe measures int8 slower than fp32); 1-point budget",
        "max_drop": 0.01,
        "passes": [
            {"pass": "cleanup", "fold_batchnorm": False},
            {"pass": "channel-pruning", "ratio": 0.3, "criterion": "thinet", "round_to": 8},
            "cleanup",
            {"pass": "quantize", "mode": "int8", "speed_guard": True},
        ],
    },
    "small": {
        "description": "size: structured pruning, magnitude pruning and 4-bit k-means sharing; "
        "1-point budget",
        "max_drop": 0.01,
        "passes": [
            {"pass": "cleanup", "fold_batchnorm": False},
            {"pass": "channel-pruning", "ratio": 0.3, "criterion": "thinet"},
            "cleanup",
            {"pass": "weight-pruning", "sparsity": 0.5},
            {"pass": "weight-sharing", "bits": 4},
        ],
    },
}
DEFAULT_WITH_DATA = "safe"


def builtin(name: str) -> Recipe:
    if name not in BUILTIN:
        raise RecipeError(f"unknown built-in recipe '{name}'; built-in: {', '.join(BUILTIN)}")
    data = {k: v for k, v in BUILTIN[name].items() if k != "description"}
    return Recipe.from_dict(data, name=name)


def resolve(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, else a YAML/JSON recipe file."""
    text = str(name_or_path)
    if text in BUILTIN:
        return builtin(text)
    return Recipe.from_file(name_or_path)
