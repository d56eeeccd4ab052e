"""Object storage by URI (plain paths, file://, s3://) and the embedded S3 server.

On a cluster nothing is node-local: run state, checkpoints, sweeps and features live here;
a node keeps only caches.
"""

from damo.storage.store import (
    MULTIPART_THRESHOLD,
    Location,
    ObjectInfo,
    Reason,
    Storage,
    StorageError,
    fs_path,
    is_allowed,
    join,
    parse_uri,
    require_allowed,
    s3_config_from_env,
)

__all__ = [
    "MULTIPART_THRESHOLD",
    "Location",
    "ObjectInfo",
    "Reason",
    "Storage",
    "StorageError",
    "fs_path",
    "is_allowed",
    "join",
    "parse_uri",
    "require_allowed",
    "s3_config_from_env",
]
