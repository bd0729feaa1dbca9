"""Typed parameters: params.yaml is read once, here, into pydantic models.

Every stage takes the section it needs as an argument; library code never reads
params.yaml or the environment itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from agegender.images import ImageLimits

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
# The names params.yaml may use; faces.py and model.py take their lists of choices from these.
DetectorName = Literal["haar", "mtcnn", "blazeface"]
Backbone = Literal["compact", "mobilenet_v3_small", "efficientnet_b0", "resnet50", "vgg16"]
AgeHead = Literal["regression", "dldl", "ordinal"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoParams(Section):
    count: int = Field(1200, ge=10, le=100_000)
    image_size: int = Field(128, ge=48, le=512)
    seed: int = 7


class IngestParams(Section):
    connect_timeout: float = Field(10.0, gt=0.0, description="s to connect to an http(s) source")
    read_timeout: float = Field(60.0, gt=0.0, description="s an http(s) download may go without receiving a byte")


class DataParams(Section):
    source: str = "demo"
    ingest: IngestParams = IngestParams()
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
    detector: DetectorName = "blazeface"
    margin: float = Field(0.0, ge=0.0, le=2.0)
    align: bool = False
    image_size: int = Field(64, ge=32, le=512)
    split: SplitFractions = SplitFractions()
    seed: int = 42
    workers: int = Field(2, ge=1, le=64)


class AugmentParams(Section):
    flip: bool = True
    rotation: float = Field(0.03, ge=0.0, le=0.5, description="fraction of a full turn")
    shift: float = Field(0.06, ge=0.0, le=0.5, description="fraction of the side")
    zoom: float = Field(0.08, ge=0.0, le=0.5)
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="fraction of the 0..255 range")
    contrast: float = Field(0.25, ge=0.0, le=1.0)
    grayscale: float = Field(0.0, ge=0.0, le=1.0, description="probability that a training image is turned grey")


class LossWeights(Section):
    age: float = Field(0.1, ge=0.0, description="L1 on years")
    age_distribution: float = Field(1.0, ge=0.0, description="dldl/ordinal loss; unused by regression")
    gender: float = Field(1.0, ge=0.0)


class LowResParams(Section):
    """The first epochs train on `size` px images made from the crops, the rest at preprocess.image_size.

    The compact network is convolutional up to a global average, so its weights fit any crop size;
    a 40 px step costs about 0.42 of a 64 px one (benchmarks/results/train_step.json).
    """

    size: int = Field(ge=16, le=512)
    epochs: int = Field(ge=1)
    # false: the crops scaled down. true: windows of them at full scale (random in training, central for
    # validation), so the network sees faces at the scale it serves.
    window: bool = False


class TrainParams(Section):
    backbone: Backbone = "compact"
    weights: Path | None = None  # a local pretrained-weights file for a keras.applications backbone
    width: int = Field(32, ge=4, le=256)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    # compact backbone: momentum of the BatchNorm moving statistics. 0.9 settles within an epoch or two of
    # the small demo data; the README's real-data recipe (hundreds of steps an epoch) uses 0.99: over two seeds
    # it scored better on adults and gender on test, and tied on validation.
    bn_momentum: float = Field(0.9, gt=0.0, lt=1.0)
    age_head: AgeHead = "dldl"
    mirror_average: bool = False  # the saved model averages its predictions on each face and its mirror image
    age_bins: int = Field(101, ge=2, le=117)
    age_sigma: float = Field(2.0, gt=0.0)
    loss_weights: LossWeights = LossWeights()
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = Field(0.003, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    # Momentum of an exponential moving average of the weights (Keras' optimizer EMA); the average is what
    # is validated, kept and saved. null: the weights as trained.
    ema_momentum: float | None = Field(None, gt=0.0, lt=1.0)
    warmup_epochs: int = Field(2, ge=0)
    epochs: int = Field(20, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=4096)
    patience: int = Field(6, ge=1)
    seed: int = 42
    augment: AugmentParams = AugmentParams()
    low_res: LowResParams | None = None  # null: every epoch at preprocess.image_size

    @model_validator(mode="after")
    def _check_low_res(self) -> TrainParams:
        if self.low_res is None:
            return self
        if self.backbone != "compact":
            raise ValueError(f"low_res needs the compact backbone; {self.backbone} is built for one crop size")
        if self.low_res.epochs >= self.epochs:
            raise ValueError(
                f"low_res.epochs ({self.low_res.epochs}) must be fewer than epochs ({self.epochs}): "
                "the model is kept from the full-size epochs"
            )
        return self


class Candidate(Section):
    """One configuration to try: overrides of the `train` section."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    train: dict = {}


class GateParams(Section):
    max_age_mae: float = Field(15.0, gt=0.0, description="years, on the test split")
    min_gender_accuracy: Fraction = 0.6
    max_group_gap: float = Field(10.0, ge=0.0, description="largest age-MAE gap between race groups, years")
    min_improvement: float = Field(
        0.1, ge=0.0, description="years of test age MAE to gain over the champion, at the interval's lower bound"
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="two-sided level of the paired bootstrap interval")
    bootstrap_resamples: int = Field(2000, ge=100, le=100_000, description="resamples of the test images")
    max_gender_accuracy_drop: Fraction = 0.02


class RegistryParams(Section):
    model_name: str = Field("agegender", min_length=1)


class ScheduleParams(Section):
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    # Runs on the work pool's workers (prefect.yaml): a run whose worker host dies stops sending heartbeats.
    heartbeat_seconds: int = Field(30, ge=30, description="flow-run heartbeat interval (Prefect's minimum is 30)")
    missed_heartbeats: int = Field(3, ge=2, description="a running flow run silent this many intervals is Crashed")
    crash_retries: int = Field(2, ge=0, le=10, description="times a Crashed run is put back for any worker to take")


class ServeParams(Section):
    model_uri: str = Field("models:/agegender@champion", pattern=r"^models:/.+")
    max_upload_mb: float = Field(10.0, gt=0.0, le=1024.0)
    max_batch_images: int = Field(16, ge=1, le=256, description="images per /predict_batch call")
    # At most agegender.images.MAX_PIXEL_LIMIT: the image library opens nothing larger.
    max_megapixels: float = Field(40.0, gt=0.0, le=150.0, description="decoded width x height, in millions")
    max_request_megapixels: float = Field(
        40.0, gt=0.0, le=1000.0, description="all images of one request together, in millions of pixels"
    )
    upload_timeout_s: float = Field(30.0, gt=0.0, description="a request body not received within this: 408")
    reload_seconds: float = Field(30.0, ge=1.0, description="how often the service looks for a new champion")
    max_batch_size: int = Field(32, ge=1, le=1024, description="images per adaptive batch of the model service")
    max_latency_ms: int = Field(5000, ge=1, description="queued longer than this: 503 with Retry-After, load shed")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)

    @property
    def image_limits(self) -> ImageLimits:
        """The per-image limits as the image loader takes them, named as params.yaml names them."""
        from agegender.images import ImageLimits  # the loader imports OpenCV; config stays light

        return ImageLimits(
            max_bytes=self.max_upload_bytes,
            max_pixels=self.max_pixels,
            max_bytes_name="serve.max_upload_mb",
            max_pixels_name="serve.max_megapixels",
        )


class DriftParams(Section):
    """The drift check: a window of served records against the champion's training reference."""

    window_hours: float = Field(24.0, gt=0.0, description="served records of the last this many hours")
    min_faces: int = Field(100, ge=10, description="fewer faces in the window: no decision")
    p_value: Fraction = Field(0.001, description="a feature drifts when its KS test's p-value is below this...")
    min_statistic: Fraction = Field(0.1, description="...and its KS statistic (largest CDF gap) is at least this")
    min_drifted_features: int = Field(1, ge=1, le=5, description="the window drifts when this many features drift")
    retrain: bool = Field(False, description="on drift, start the agegender-training/retrain deployment")
    cron: str = "0 4 * * *"


class MonitorParams(Section):
    """What production sees: Prometheus metrics and served-input records (README: Monitor the model)."""

    enabled: bool = Field(True, description="project metrics on /metrics and served-input records")
    records: str = Field("monitoring/records", min_length=1, description="a folder or fsspec URL (s3://...)")
    batch_records: int = Field(200, ge=1, le=100_000, description="records per written file")
    flush_seconds: float = Field(60.0, gt=0.0, description="a batch is written at most this long after it starts")
    store_uploads: bool = Field(False, description="also store each uploaded image beside its record")
    reports: Path = Field(Path("artifacts/monitor"), description="drift reports (HTML and JSON)")
    drift: DriftParams = DriftParams()


Port = Annotated[int, Field(ge=1, le=65535)]
SEAWEED_PORTS = ("master", "master gRPC", "volume", "volume gRPC", "filer", "filer gRPC", "S3 gRPC")


class StackPorts(Section):
    postgres: Port = 5433
    s3: Port = 8333
    mlflow: Port = 5000
    prefect: Port = 4200
    seaweed: int = Field(
        19333, ge=1, le=65535 - len(SEAWEED_PORTS) + 1, description="first of SeaweedFS's 7 internal ports"
    )

    def named(self) -> dict[int, str]:
        """Every port the stack listens on -> what it is, for clear 'port taken' messages."""
        ports = {
            self.postgres: "PostgreSQL (stack.ports.postgres)",
            self.s3: "the S3 store (stack.ports.s3)",
            self.mlflow: "the MLflow server (stack.ports.mlflow)",
            self.prefect: "the Prefect server (stack.ports.prefect)",
        }
        for offset, name in enumerate(SEAWEED_PORTS):
            ports.setdefault(self.seaweed + offset, f"SeaweedFS {name} (stack.ports.seaweed + {offset})")
        return ports

    @model_validator(mode="after")
    def _distinct(self) -> StackPorts:
        if len(self.named()) != 4 + len(SEAWEED_PORTS):
            raise ValueError(
                f"ports must all differ, and seaweed uses {self.seaweed}..{self.seaweed + len(SEAWEED_PORTS) - 1}"
            )
        return self


BucketName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]


class StackBuckets(Section):
    dvc: BucketName = "agegender-dvc"
    mlflow: BucketName = "agegender-mlflow"


class StackParams(Section):
    """The team stack on this machine (agegender stack up): PostgreSQL, S3 (SeaweedFS), MLflow, Prefect."""

    dir: Path = Field(Path(".stack"), description="databases, object store, logs and secrets.env; git ignores it")
    host: str = Field("127.0.0.1", min_length=1, description="address every server listens on and clients use")
    ports: StackPorts = StackPorts()
    buckets: StackBuckets = StackBuckets()


class ScaleParams(Section):
    """Where the data-parallel work runs: this machine's threads, or a Dask cluster (README: Scale out)."""

    dask_scheduler: str | None = Field(
        None,
        pattern=r"^(tcp|tls)://.+:\d+$",
        description="null: local threads; tcp://HOST:PORT: face detection shards and candidates on its workers",
    )
    shard_images: int = Field(200, ge=1, le=100_000, description="images per face-detection task on the cluster")
    join_seconds: int = Field(
        600, ge=1, le=86_400, description="multi-worker training (TF_CONFIG): how long a worker waits for the others"
    )


class Params(Section):
    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    candidates: list[Candidate] = Field([Candidate(name="default")], min_length=1)
    gates: GateParams = GateParams()
    registry: RegistryParams = RegistryParams()
    schedule: ScheduleParams = ScheduleParams()
    serve: ServeParams = ServeParams()
    monitor: MonitorParams = MonitorParams()
    stack: StackParams = StackParams()
    scale: ScaleParams = ScaleParams()

    @model_validator(mode="after")
    def _check_candidates(self) -> Params:
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must be unique, got {names}")
        for index, candidate in enumerate(self.candidates):
            try:
                self.candidate_train(candidate)
            except ValidationError as err:
                raise ValueError(
                    f"candidates.{index} ({candidate.name}).train: " + _describe(err, TrainParams)
                ) from None
            low_res = self.candidate_train(candidate).low_res
            if low_res and low_res.size >= self.preprocess.image_size:
                raise ValueError(
                    f"candidate {candidate.name}: train.low_res.size ({low_res.size}) must be smaller than "
                    f"preprocess.image_size ({self.preprocess.image_size})"
                )
        return self

    def model_settings(self, exclude: frozenset[str] = frozenset()) -> dict:
        """The sections that make a model, as MLflow logs them and the registry hashes them.

        `stack` says where the team's servers run, `monitor` how the served model is watched and
        `scale` where the work runs (the results are the same), not how a model is made: all are left out.
        """
        return self.model_dump(by_alias=True, mode="json", exclude={"stack", "monitor", "scale", *exclude})

    def candidate_train(self, candidate: Candidate) -> TrainParams:
        """The train section with the candidate's overrides applied (nested sections merged)."""
        merged = self.train.model_dump(mode="json")
        for key, value in candidate.train.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return TrainParams.model_validate(merged)


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


def _describe(err: ValidationError, root: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(part) for part in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(root or Params, e["loc"][:-1]))
            lines.append(f"unknown key '{key}' (allowed here: {allowed})")
        elif e["type"] == "value_error":  # our own checks: the message names the keys
            lines.append(f"{key + ': ' if key else ''}{e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = next(f for name, f in model.model_fields.items() if (f.alias or name) == part)
        model = field.annotation
    return [f.alias or name for name, f in model.model_fields.items()]


class ModelSpec(Section):
    """What a saved model needs to be served without params.yaml; stored beside its weights."""

    image_size: int
    margin: float
    align: bool = False  # crops turned so the eyes are level (specs saved before it: False)
    detector: str
    backbone: str
    age_head: str
    data_version: str
    trained_on: Literal["demo", "real"]
