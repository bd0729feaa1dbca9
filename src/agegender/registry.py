"""The registered model: versions, the `champion` / `challenger` aliases and rollback.

Every evaluated winner becomes a new version, tagged with its provenance (data version,
git commit, params hash, test metrics as `test_<name>` tags) and its gate decision. A
failed gate is a normal outcome: the version is still registered, it just moves no alias.
`challenger` marks the newest version that passed the absolute gates; `champion` moves
only on a full pass, or by hand with `promote` / `rollback`.

Crash safety. A registration is a sequence of writes, and the process may die between
any two of them. The invariants that hold after every single write:

- A version is created together with all its tags in one call, so no version is ever
  half-tagged. Aliases are set only after the version is READY and tagged, and the
  `registration_complete` tag is written last of all.
- A version without that tag and without aliases never got past registration (died, or
  the wait for READY failed): `list_versions` ignores it, `promote` refuses it, and the
  next `register_candidate` deletes it. No alias can point at it.
- A version without that tag but holding an alias died while its aliases were being set;
  it is READY and tagged, so the next `register_candidate` / `promote` / `rollback` first
  finishes its registration (applies its recorded decision again, which is idempotent)
  rather than delete it: deleting a version drops its aliases and could leave no champion.

Champion history. The registered-model tag `champion_history` is a JSON list of the
versions that held `champion` before the current one, oldest first. Moving the champion
pushes the old one and then sets the alias; rollback sets the alias and then pops. A crash
between the two writes leaves the current champion on top of the list, which can never
happen otherwise (consecutive entries differ), so readers drop such entries.

Registrations, promotions and rollbacks of one model are assumed to run one at a time
(the pipeline is a single DVC / Prefect run): the start-of-call cleanup would delete a
registration that another process has in flight.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.logged_model import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.entities.model_registry.model_version_status import ModelVersionStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from agegender import paths
from agegender.config import Params
from agegender.files import write_json
from agegender.tracking import configure_tracking

DEFAULT_MODEL_NAME = "agegender"
CHAMPION = "champion"
CHALLENGER = "challenger"
COMPLETE_TAG = "registration_complete"
HISTORY_TAG = "champion_history"
METRIC_PREFIX = "test_"
# Tags this module writes itself, so callers may not pass them.
RESERVED_TAGS = frozenset({"run_id", "model_id", "gate_summary", "absolute_pass", "full_pass", COMPLETE_TAG})
READY = ModelVersionStatus.to_string(ModelVersionStatus.READY)
READY_TIMEOUT_SECONDS = 300
CARD_FOLDER = "card"  # the model card and test metrics, in the registered model's artifacts


class RegistryError(ValueError):
    """A registry request that cannot be honoured (a ValueError: it names bad input or state)."""


@dataclass(frozen=True)
class RegistrationResult:
    """What `register_candidate` did."""

    model_name: str
    version: int
    aliases: list[str]
    champion: int | None
    previous_champion: int | None
    gate_summary: str
    finished: list[int]
    removed: list[int]

    @property
    def summary(self) -> str:
        moved = ", ".join(self.aliases) or "no alias (the gate failed)"
        text = f"Registered {self.model_name} version {self.version}: {moved}."
        if self.champion is None:
            text += " No champion yet."
        elif self.champion == self.previous_champion:
            text += f" Champion stays at version {self.champion}."
        elif self.previous_champion is None:
            text += f" Version {self.champion} is the first champion."
        else:
            text += f" Champion moved from version {self.previous_champion} to {self.champion}."
        text += f" Gate: {self.gate_summary}"
        if self.finished:
            text += f"\nFinished interrupted registrations of versions {self.finished}."
        if self.removed:
            text += f"\nRemoved incomplete versions {self.removed}."
        return text

    def as_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary}


@dataclass(frozen=True)
class ChampionInfo:
    """The champion and the data version it was trained on (None if neither the version nor its run says)."""

    version: int
    run_id: str | None
    data_version: str | None


def champion_uri(model_name: str = DEFAULT_MODEL_NAME) -> str:
    """The URI that always loads the current champion."""
    return f"models:/{model_name}@{CHAMPION}"


def find_version(client: MlflowClient, model_uri: str) -> ModelVersion | None:
    """The version models:/NAME@ALIAS or models:/NAME/VERSION names; None if that model, alias or version is missing."""
    if not model_uri.startswith("models:/"):
        raise RegistryError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        number = _aliases(client, name).get(alias)
        if number is None:
            return None
    else:
        name, _, number = ref.rpartition("/")
        if not name or not number.isdigit():
            raise RegistryError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        return client.get_model_version(name, str(number))
    except MlflowException as err:
        if _is_missing(err):
            return None
        raise


def resolve_version(client: MlflowClient, model_uri: str) -> ModelVersion:
    """Like `find_version`, but a missing version is a RegistryError that names the URI."""
    version = find_version(client, model_uri)
    if version is None:
        raise RegistryError(f"{model_uri}: no such model version in the registry")
    return version


def champion(client: MlflowClient, model_name: str = DEFAULT_MODEL_NAME) -> ModelVersion | None:
    """The version the champion alias points at; None without a registered model or champion."""
    return find_version(client, champion_uri(model_name))


def champion_info(client: MlflowClient, model_name: str = DEFAULT_MODEL_NAME) -> ChampionInfo | None:
    """The champion with its data version; None when there is no champion."""
    version = champion(client, model_name)
    if version is None:
        return None
    data = (version.tags or {}).get("data_version")
    if not data and version.run_id:  # versions registered without the tag: the training run has it
        data = client.get_run(version.run_id).data.tags.get("data_version")
    return ChampionInfo(version=int(version.version), run_id=version.run_id, data_version=data)


def run_register_stage(root: Path, params: Params, *, tracking_uri: str | None) -> RegistrationResult:
    """The register stage: register the evaluated winner with its provenance, move aliases, write registration.json.

    Reads the gate decision and test metrics from artifacts/eval and the model card from
    artifacts/model; the card and the test metrics (with the per-group gaps) are attached to
    the version's model as card/ and its description. `tracking_uri` is the store the model
    was logged in (None: the project's own, see `tracking.configure_tracking`).
    """
    configure_tracking(root, tracking_uri)
    client = MlflowClient()
    decision = json.loads((root / paths.EVAL / paths.GATE).read_text())
    metrics = json.loads((root / paths.EVAL / paths.TEST_METRICS).read_text())
    card = json.loads((root / paths.MODEL / paths.MODEL_CARD).read_text())
    run_id = card["mlflow_run_id"]
    result = register_candidate(
        client,
        model_name=params.registry.model_name,
        model_uri=f"runs:/{run_id}/model",
        run_id=run_id,
        tags={
            "data_version": card["data_version"],
            "git_commit": client.get_run(run_id).data.tags.get("git_commit", "unknown"),
            "params_hash": hash_params(params),
            **{f"{METRIC_PREFIX}{k}": str(v) for k, v in metrics.items() if isinstance(v, int | float)},
        },
        decision=decision,
        attachments=[root / paths.MODEL / paths.MODEL_CARD, root / paths.EVAL / paths.TEST_METRICS],
        description=version_description(card, metrics, params.gates.max_group_gap),
    )
    write_json(root / paths.REGISTRY / paths.REGISTRATION, result.as_dict())
    return result


# The registry stores at most this many characters of a version's description.
MAX_DESCRIPTION = 5000


def version_description(card: dict, metrics: dict, max_group_gap: float) -> str:
    """The model card and the test metrics per group, as the registry UI shows a version (markdown)."""
    lines = [
        f"**{card['model']}**, trained on {card['trained_on']} data (DVC data version `{card['data_version']}`).",
        "",
        card["intended_use"],
        "",
        f"Test split: {metrics['n_samples']} faces, age MAE {metrics['age_mae']} years, "
        f"gender accuracy {metrics['gender_accuracy']}.",
        "",
        "| group | faces | age MAE | gender accuracy |",
        "|---|---|---|---|",
        *(
            f"| {name} | {g['n_samples']} | {g['age_mae']} | {g['gender_accuracy']} |"
            for name, g in metrics["by_race"].items()
        ),
        "",
        f"Largest gaps between groups: age MAE {metrics['age_mae_group_gap']} years (gate: at most "
        f"{max_group_gap:g}), gender accuracy {metrics['gender_accuracy_group_gap']}. "
        "Full card and metrics: the model's card/ artifacts.",
    ]
    return "\n".join(lines)[:MAX_DESCRIPTION]


def hash_params(params: Params) -> str:
    """A short hash of every parameter, tagged on each version to tell runs with equal params."""
    return hashlib.sha256(json.dumps(params.model_settings(), sort_keys=True).encode()).hexdigest()[:12]


def register_candidate(
    client: MlflowClient,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    decision: dict,
    attachments: Sequence[Path] = (),
    description: str | None = None,
    before_alias: Callable[[], None] | None = None,
) -> RegistrationResult:
    """Register the logged model as a new version and move aliases as the gate decided.

    `model_uri` is `runs:/<run_id>/<name>` or `models:/m-<id>` for an MLflow 3 logged model
    of run `run_id`. `tags` carries provenance and `test_<metric>` values; the gate
    decision's summary and passes, run and model ids are added. `before_alias` runs after
    the version is READY and tagged and before any alias moves: it exists so tests can
    kill the registration at its most delicate point; production passes None.
    `attachments` (files) go to the logged model's card/ before the version exists, so a
    version never lacks them and a repeated registration only uploads them again.
    """
    absolute, full = bool(decision["absolute_pass"]), bool(decision["full_pass"])
    if full and not absolute:
        raise ValueError("inconsistent gate decision: full_pass without absolute_pass")
    if clash := sorted(tags.keys() & RESERVED_TAGS):
        raise ValueError(f"tags {clash} are written by the registry itself")
    logged = _logged_model(client, model_uri, run_id)
    for path in attachments:
        client.log_model_artifact(logged.model_id, str(path), CARD_FOLDER)
    _ensure_registered_model(client, model_name)
    finished, removed = _recover(client, model_name, remove_abandoned=True)
    previous = _aliases(client, model_name).get(CHAMPION)

    version_tags = {
        **tags,
        "run_id": run_id,
        "model_id": logged.model_id,
        "gate_summary": decision["summary"],
        "absolute_pass": json.dumps(absolute),
        "full_pass": json.dumps(full),
    }
    # The logged model's artifact location, not `models:/m-...`: the sqlite registry resolves
    # a models:/ source through the process-global tracking URI instead of this client's store.
    # The call raises unless the version turns READY in time; such a version has no aliases.
    version = client.create_model_version(
        model_name,
        logged.artifact_location,
        run_id=run_id,
        tags=version_tags,
        await_creation_for=READY_TIMEOUT_SECONDS,
        model_id=logged.model_id,
        description=description,
    )
    if before_alias is not None:
        before_alias()
    number = int(version.version)
    _apply_decision(client, model_name, number, absolute, full)
    client.set_model_version_tag(model_name, str(number), COMPLETE_TAG, "true")
    return RegistrationResult(
        model_name=model_name,
        version=number,
        aliases=[alias for alias, passed in ((CHALLENGER, absolute), (CHAMPION, full)) if passed],
        champion=_aliases(client, model_name).get(CHAMPION),
        previous_champion=previous,
        gate_summary=decision["summary"],
        finished=finished,
        removed=removed,
    )


def promote(client: MlflowClient, model_name: str, version: int | str) -> ModelVersion:
    """Move champion to `version` (any complete READY version, whatever its gate said)."""
    number = int(version)
    _recover(client, model_name, remove_abandoned=False)
    _usable_version(client, model_name, number)
    _move_champion(client, model_name, number)
    return client.get_model_version(model_name, str(number))


def rollback(client: MlflowClient, model_name: str = DEFAULT_MODEL_NAME) -> ModelVersion:
    """Return champion to the version before it; repeated calls walk further back."""
    _recover(client, model_name, remove_abandoned=False)
    current = _aliases(client, model_name).get(CHAMPION)
    history = _history(client, model_name, current)
    if not history:
        raise RegistryError(
            f"{model_name} has no previous champion to roll back to "
            f"(current champion: {current if current is not None else 'none'})"
        )
    target = history[-1]
    _usable_version(client, model_name, target)
    # alias first, then pop: a crash in between leaves the new champion on top of the
    # history, which _history drops, rather than losing the version to roll back to
    client.set_registered_model_alias(model_name, CHAMPION, str(target))
    _write_history(client, model_name, history[:-1])
    return client.get_model_version(model_name, str(target))


def list_versions(client: MlflowClient, model_name: str = DEFAULT_MODEL_NAME) -> list[dict]:
    """Registered versions, newest first, without abandoned incomplete registrations."""
    aliases = _aliases(client, model_name)
    by_version: dict[int, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(number, []).append(alias)
    rows = []
    for version in _versions(client, model_name):
        number = int(version.version)
        tags = version.tags or {}
        if COMPLETE_TAG not in tags and number not in by_version:
            continue
        rows.append(
            {
                "version": number,
                "aliases": sorted(by_version.get(number, [])),
                "run_id": version.run_id,
                "data_version": tags.get("data_version"),
                "git_commit": tags.get("git_commit"),
                "metrics": {
                    key.removeprefix(METRIC_PREFIX): _number(value)
                    for key, value in sorted(tags.items())
                    if key.startswith(METRIC_PREFIX)
                },
                "absolute_pass": tags.get("absolute_pass") == "true",
                "full_pass": tags.get("full_pass") == "true",
                "gate_summary": tags.get("gate_summary"),
                "created": datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
            }
        )
    return sorted(rows, key=lambda row: row["version"], reverse=True)


def _number(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def _is_missing(err: MlflowException) -> bool:
    return err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def _logged_model(client: MlflowClient, model_uri: str, run_id: str) -> LoggedModel:
    """The MLflow 3 logged model behind `model_uri`, checked to come from run `run_id`."""
    if model_uri.startswith("models:/m-"):
        model = client.get_logged_model(model_uri.removeprefix("models:/"))
    elif model_uri.startswith(f"runs:/{run_id}/"):
        # MLflow 3 stores the model's files with the logged model, not in the run's
        # artifacts; the run only lists it among its outputs.
        name = model_uri.removeprefix(f"runs:/{run_id}/").strip("/")
        outputs = client.get_run(run_id).outputs
        ids = [output.model_id for output in (outputs.model_outputs if outputs else [])]
        named = [m for m in map(client.get_logged_model, ids) if m.name == name]
        if len(named) != 1:
            raise ValueError(f"{model_uri}: run {run_id} has {len(named)} logged models named {name!r}")
        model = named[0]
    else:
        raise ValueError(f"{model_uri}: expected runs:/{run_id}/<name> or models:/m-<id>")
    if model.source_run_id != run_id:
        raise ValueError(f"{model_uri} was logged by run {model.source_run_id}, not {run_id}")
    return model


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.get_registered_model(model_name)
    except MlflowException as err:
        if not _is_missing(err):
            raise
        client.create_registered_model(model_name)


def _aliases(client: MlflowClient, model_name: str) -> dict[str, int]:
    """alias -> version number; empty when the model is not registered."""
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as err:
        if _is_missing(err):
            return {}
        raise
    return {alias: int(number) for alias, number in model.aliases.items()}


def _versions(client: MlflowClient, model_name: str) -> list[ModelVersion]:
    versions: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{model_name}'", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def _recover(client: MlflowClient, model_name: str, *, remove_abandoned: bool) -> tuple[list[int], list[int]]:
    """Finish interrupted registrations that hold an alias; optionally delete the others.

    Returns (finished, removed) version numbers.
    """
    aliased = set(_aliases(client, model_name).values())
    finished, removed = [], []
    for version in _versions(client, model_name):
        tags = version.tags or {}
        if COMPLETE_TAG in tags:
            continue
        number = int(version.version)
        if number in aliased:
            _apply_decision(
                client,
                model_name,
                number,
                tags.get("absolute_pass") == "true",
                tags.get("full_pass") == "true",
            )
            client.set_model_version_tag(model_name, str(number), COMPLETE_TAG, "true")
            finished.append(number)
        elif remove_abandoned:
            client.delete_model_version(model_name, str(number))
            removed.append(number)
    return sorted(finished), sorted(removed)


def _apply_decision(client: MlflowClient, model_name: str, version: int, absolute: bool, full: bool) -> None:
    """Set the aliases a gate decision earns; safe to repeat after a crash."""
    if absolute:
        client.set_registered_model_alias(model_name, CHALLENGER, str(version))
    if full:
        _move_champion(client, model_name, version)


def _move_champion(client: MlflowClient, model_name: str, version: int) -> None:
    current = _aliases(client, model_name).get(CHAMPION)
    if current == version:
        return
    if current is not None:
        # push first, then move: a crash in between leaves the still-current champion on
        # top of the history, which _history drops
        _write_history(client, model_name, [*_history(client, model_name, current), current])
    client.set_registered_model_alias(model_name, CHAMPION, str(version))


def _usable_version(client: MlflowClient, model_name: str, version: int) -> ModelVersion:
    """The version if an alias may point at it, else a RegistryError naming it."""
    try:
        found = client.get_model_version(model_name, str(version))
    except MlflowException as err:
        if _is_missing(err):
            raise RegistryError(f"{model_name} version {version} does not exist") from None
        raise
    if found.status != READY:
        raise RegistryError(f"{model_name} version {version} is {found.status}, not {READY}")
    if COMPLETE_TAG not in (found.tags or {}):
        raise RegistryError(
            f"{model_name} version {version} never finished registering (the next registration removes it)"
        )
    return found


def _history(client: MlflowClient, model_name: str, current: int | None) -> list[int]:
    """Previous champions, oldest first, without leftovers of an interrupted move."""
    try:
        raw = client.get_registered_model(model_name).tags.get(HISTORY_TAG, "[]")
    except MlflowException as err:
        if _is_missing(err):
            return []
        raise
    history = [int(v) for v in json.loads(raw)]
    while history and history[-1] == current:
        history.pop()
    return history


def _write_history(client: MlflowClient, model_name: str, history: list[int]) -> None:
    client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
