"""The checkpoint registry: named entries in object storage that point at a checkpoint.

    <tune.registry>/best.json              the best trial of the latest finished sweep
    <tune.registry>/sweeps/<sweep>.json    the best trial of each sweep

An entry holds the checkpoint URI, the trial's whole config, the metric, the sweep and the code
version. Wherever a command takes a checkpoint, `best` means the first file and `best:<sweep>`
the second (`resolve_checkpoint`).
"""

from __future__ import annotations

import json

from damo.config import DamoConfig
from damo.storage import Storage, join

BEST = "best"


class RegistryError(LookupError):
    """A registry entry that does not exist or cannot be read."""


def entry_uri(cfg: DamoConfig, sweep: str | None = None) -> str:
    registry = cfg.tune.registry
    return join(registry, "sweeps", f"{sweep}.json") if sweep else join(registry, "best.json")


def write_entry(cfg: DamoConfig, entry: dict, storage: Storage) -> list[str]:
    """Register `entry` as its sweep's best and as the latest `best`; the URIs written."""
    body = json.dumps(entry, indent=2).encode()
    uris = [entry_uri(cfg, entry["sweep"]), entry_uri(cfg)]
    storage.ensure_bucket(uris[0])
    for uri in uris:
        storage.write_bytes(uri, body)
    return uris


def read_entry(cfg: DamoConfig, sweep: str | None = None, storage: Storage | None = None) -> dict:
    storage = storage or Storage(cfg.storage.s3)
    uri = entry_uri(cfg, sweep)
    if not storage.exists(uri):
        what = f"sweep '{sweep}'" if sweep else "any sweep"
        raise RegistryError(
            f"no registry entry for {what} at {uri}: run `damo tune --space ... --name NAME` "
            "first (it registers its best trial when it finishes), or pass a checkpoint URI"
        )
    try:
        return json.loads(storage.read_bytes(uri))
    except ValueError as err:
        raise RegistryError(f"registry entry {uri} is not valid JSON: {err}") from err


def is_registry_name(checkpoint: str) -> bool:
    return checkpoint == BEST or checkpoint.startswith(f"{BEST}:")


def resolve_checkpoint(checkpoint: str, cfg: DamoConfig, storage: Storage | None = None) -> str:
    """`best` -> the latest sweep's best checkpoint; `best:<sweep>` -> that sweep's; a URI as
    it is."""
    if not is_registry_name(checkpoint):
        return checkpoint
    sweep = checkpoint.partition(":")[2] or None
    if checkpoint.endswith(":"):
        raise RegistryError("'best:' needs a sweep name, e.g. best:fuseformer-1")
    return read_entry(cfg, sweep, storage)["checkpoint"]
