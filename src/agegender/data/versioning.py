"""The dataset's version under DVC: track data/ in data.dvc, push it, read its md5."""

from __future__ import annotations

from pathlib import Path

import yaml


class VersioningError(RuntimeError):
    """DVC could not track or push the dataset."""


def track_dataset(repo_root: Path, data_dir: Path) -> None:
    """`dvc add` data_dir; on failure the previous data.dvc is restored."""
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    dvc_file = data_dir.with_suffix(".dvc")
    before = dvc_file.read_bytes() if dvc_file.exists() else None
    try:
        with Repo(str(repo_root)) as repo:
            repo.add(str(data_dir))
    except NotDvcRepoError as err:
        raise VersioningError(f"{repo_root}: not a DVC repository; run `git init && dvc init` first") from err
    except (DvcException, OSError) as err:
        if before is None:
            dvc_file.unlink(missing_ok=True)
        else:
            dvc_file.write_bytes(before)
        raise VersioningError(f"dvc could not track {data_dir}: {err}") from err


def push_dataset(repo_root: Path, data_dir: Path) -> str | None:
    """Push the dataset to the default DVC remote; returns the remote's name, or None if none is set."""
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        remote = repo.config["core"].get("remote")
        if not remote:
            return None
        try:
            repo.push(targets=[str(data_dir.with_suffix(".dvc"))])
        except Exception as err:  # DVC's errors, and its remotes' that it lets through (botocore, OSError)
            raise VersioningError(f"dvc push to remote '{remote}' failed: {err}") from err
    return remote


def data_version(dvc_file: Path) -> str:
    """The md5 that DVC recorded for the dataset (changes whenever any image or label does)."""
    if not dvc_file.exists():
        raise VersioningError(f"{dvc_file}: not found; ingest a dataset first (agegender data ingest demo)")
    meta = yaml.safe_load(dvc_file.read_text())
    return meta["outs"][0]["md5"].removesuffix(".dir")


def pull_dataset(repo_root: Path, data_dir: Path) -> bool:
    """Check out the dataset data.dvc names, from the cache or the default remote.

    Returns False (and changes nothing) when there is no data.dvc or no copy of it exists. A
    remote that cannot be reached is an error, not a missing copy: falling back to a fresh
    ingest then would replace the team's data version.
    """
    from dvc.exceptions import CheckoutError
    from dvc.repo import Repo

    dvc_file = data_dir.with_suffix(".dvc")
    if not dvc_file.exists():
        return False
    with Repo(str(repo_root)) as repo:
        remote = repo.config["core"].get("remote")
        try:
            repo.pull(targets=[str(dvc_file)])
        except CheckoutError:
            return False
        except Exception as err:  # DVC's errors, and its remotes' that it lets through (botocore, OSError)
            raise VersioningError(f"dvc pull of {dvc_file.name} from remote '{remote}' failed: {err}") from err
    return True
