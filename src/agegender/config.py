"""Typed parameters: params.yaml is read once, here, into pydantic models.

Every stage takes the section it needs as an argument; library code never reads
params.yaml or the environment itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoParams(Section):
    count: int = Field(1200, ge=10, le=100_000)
    image_size: int = Field(128, ge=48, le=512)
    seed: int = 7


class DataParams(Section):
    source: str = "demo"
    demo: DemoParams = DemoParams()


class ValidateParams(Section):
    min_side: int = Field(48, ge=1)
    min_rows: int = Field(100, ge=1)
    gender_share: tuple[Fraction, Fraction] = (0.2, 0.8)
    age_buckets: list[Annotated[int, Field(ge=0, le=117)]] = [0, 10, 20, 30, 45, 60, 117]
    max_bad_fraction: Fraction = 0.05
    workers: int = Field(2, ge=1, le=64)

    @model_validator(mode="after")
    def _check_bounds(self) -> ValidateParams:
        low, high = self.gender_share
        if low > high:
            raise ValueError(f"gender_share must be [low, high] with low <= high, got {low}, {high}")
        edges = self.age_buckets
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"age_buckets must be at least two strictly increasing edges, got {edges}")
        return self


class SplitFractions(Section):
    train: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.8
    val: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    test: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class PreprocessParams(Section):
    detector: Literal["haar", "mtcnn"] = "haar"
    margin: float = Field(0.4, ge=0.0, le=2.0)
    image_size: int = Field(64, ge=32, le=512)
    split: SplitFractions = SplitFractions()
    seed: int = 42
    workers: int = Field(2, ge=1, le=64)


class Params(Section):
    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    preprocess: PreprocessParams = PreprocessParams()


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or holds a bad value."""


def load_params(path: Path = Path("params.yaml")) -> Params:
    """Load and check params.yaml; errors name the key and what is allowed."""
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: " + _describe(err)) from None


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(part) for part in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(e["loc"][:-1]))
            lines.append(f"unknown key '{key}' (allowed here: {allowed})")
        else:
            lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc:
        field = next(f for name, f in model.model_fields.items() if (f.alias or name) == part)
        model = field.annotation
    return [f.alias or name for name, f in model.model_fields.items()]
