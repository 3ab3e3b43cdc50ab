"""Checkpoint locations that are local paths or URIs (s3://, gs://, hf://, anything fsspec resolves).

`locate` turns what a user typed into a `Location` (an fsspec filesystem and a path on it) and
answers a missing bucket or prefix, missing credentials, a 403 or an unreachable endpoint with one
line that says what to fix. `Location.read_range` is one ranged GET of exactly the bytes asked;
`Location.open` streams without read-ahead. (Writing a finished model to a path or URI:
`publish.py`.)

Settings come from the filesystem library's usual environment, read when a filesystem is first
built in a process (fsspec caches instances by their arguments: `clear_instance_caches`). For S3:
the endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or FSSPEC_S3_ENDPOINT_URL, read when
fsspec is imported), credentials from botocore's chain. Errors name variables, never their values.
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations, registry

from ckmerge_ray.errors import CheckpointError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")  # scheme:// or fsspec chaining a::b://
_LOCAL = LocalFileSystem()
# Where each library looks for credentials, named in errors (values are never read out).
_S3_CREDENTIALS = ("botocore", "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), "
                   "AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE (default ~/.aws/credentials), "
                   "AWS_CONFIG_FILE (default ~/.aws/config), AWS_WEB_IDENTITY_TOKEN_FILE, then "
                   "container/EC2 instance metadata (off with AWS_EC2_METADATA_DISABLED=true)")
_GCS_CREDENTIALS = ("google-auth", "GOOGLE_APPLICATION_CREDENTIALS (a service-account JSON file), "
                    "gcloud application-default credentials (`gcloud auth application-default "
                    "login`), then GCE metadata; gcsfs falls back to anonymous access")
_CREDENTIALS = {"s3": _S3_CREDENTIALS, "s3a": _S3_CREDENTIALS, "gs": _GCS_CREDENTIALS, "gcs": _GCS_CREDENTIALS}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                      "ProfileNotFound", "DefaultCredentialsError", "RefreshError"}
_UNREACHABLE_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                       "ClientConnectorDNSError", "ServerDisconnectedError", "ConnectionRefusedError"}
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CONNECTION_STRING|ACCOUNT_KEY|SAS", re.I)
_read_bytes: Dict[str, int] = {}
_read_lock = threading.Lock()


def is_uri(location) -> bool:
    """True for ``scheme://...`` (or fsspec's chained ``a::b://``) other than ``file://``."""
    if isinstance(location, Location):
        return not location.is_local
    if isinstance(location, os.PathLike):
        return False
    s = str(location)
    return bool(_URI.match(s)) and not s.lower().startswith("file://")


@dataclass(frozen=True)
class Location:
    """One file or directory, local or remote: `path` is as `fs` understands it (no protocol)."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def uri(self) -> str:
        """The user-facing string: an absolute local path, or ``s3://bucket/key``."""
        return self.path if self.is_local else self.fs.unstrip_protocol(self.path)

    @property
    def local_path(self) -> Optional[Path]:
        return Path(self.path) if self.is_local else None

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> "Location":
        if self.is_local:
            return Location(self.fs, str(Path(self.path).parent))
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")))

    def joinpath(self, *parts: str) -> "Location":
        if self.is_local:
            return Location(self.fs, os.path.join(self.path, *parts))
        return Location(self.fs, "/".join([self.path.rstrip("/"), *(p.strip("/") for p in parts)]))

    __truediv__ = joinpath

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({redact(self.uri)!r})"

    def exists(self) -> bool:
        with translated_errors(self, "path", missing_ok=True):
            return self.fs.exists(self.path)

    def isdir(self) -> bool:
        with translated_errors(self, "path", missing_ok=True):
            return self.fs.isdir(self.path)

    def isfile(self) -> bool:
        with translated_errors(self, "path", missing_ok=True):
            return self.fs.isfile(self.path)

    def size(self) -> int:
        """Size in bytes (one HEAD for a remote file); CheckpointError if it is missing."""
        with translated_errors(self, "file"):
            return int(self.fs.size(self.path))

    def read_bytes(self) -> bytes:
        """The whole file; CheckpointError if it is missing or unreadable."""
        with translated_errors(self, "file"):
            data = self.fs.cat_file(self.path)
        _count(self.uri, len(data))
        return data

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file: one ranged GET of exactly that range for a remote file.

        Raises ValueError for a bad range, CheckpointError if the file is shorter than `end`.
        """
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise ValueError(f"byte range must satisfy 0 <= start <= end, got [{start}, {end})")
        if start == end:
            return b""
        with translated_errors(self, "file"):
            try:  # keywords: s3fs's cat_file takes version_id as its second positional argument
                data = self.fs.cat_file(self.path, start=start, end=end)
            except OSError as e:  # a range past the end: S3 answers 416 instead of no bytes
                if isinstance(e, (FileNotFoundError, PermissionError)) or self.fs.size(self.path) > start:
                    raise
                data = b""
        _count(self.uri, len(data))
        if len(data) != end - start:
            raise CheckpointError(f"{redact(self.uri)}: asked for bytes [{start}, {end}) but the file is "
                                  f"shorter (got {len(data)} bytes): truncated, or replaced while being read?")
        return data

    def fingerprint(self) -> tuple:
        """A cheap change detector: (size, version) of a file, or of every file under a directory.

        The version is the ETag and modification time of an object (gcs: its generation), or
        the mtime in ns and inode of a local file (an atomic replace changes the inode).
        """
        with translated_errors(self, "path"):
            info = self.fs.info(self.path)
            if info["type"] != "directory":
                st = os.stat(self.path) if self.is_local else None
                return (st.st_size, st.st_mtime_ns, st.st_ino) if st else _version(info)
            found = self.fs.find(self.path, detail=True)
            return tuple((posixpath.relpath(name, self.path), _version(i)) for name, i in sorted(found.items()))

    def listdir(self) -> List["Location"]:
        """Children (files and directories), sorted by name; CheckpointError if not a directory."""
        with translated_errors(self, "directory"):
            entries = self.fs.ls(self.path, detail=True)
        own = self.path.rstrip("/")
        if len(entries) == 1 and entries[0]["type"] == "file" and entries[0]["name"].rstrip("/") == own:
            raise CheckpointError(f"{redact(self.uri)} is a file, not a directory")
        names = {e["name"].rstrip("/") for e in entries} - {own}  # some stores list the dir itself
        return [Location(self.fs, n) for n in sorted(names, key=posixpath.basename)]

    def open(self, mode: str = "rb", **kwargs):
        """``fs.open`` pass-through. Remote reads default to no read-ahead (each ``read(n)`` is one
        GET of n bytes): right for large sequential reads; a parser of many small reads
        (torch.load, pickle) wants ``cache_type="readahead"`` or bytes from `read_range`."""
        if "r" in mode and not self.is_local:
            kwargs.setdefault("cache_type", "none")
        with translated_errors(self, "file"):
            return self.fs.open(self.path, mode, **kwargs)


def locate(location: Union[str, os.PathLike, Location], must_exist: bool = True,
           what: str = "checkpoint", storage_options: Optional[dict] = None) -> Location:
    """Resolve a local path (made absolute) or a URI to a Location.

    `what` names the thing in errors ("checkpoint 's3://b/run/x' does not exist ...").
    `storage_options` go to the filesystem (e.g. ``{"anon": True}``). Raises CheckpointError for
    an unknown protocol, a missing filesystem package, a missing bucket or prefix (when
    `must_exist`), missing credentials or a denied request.
    """
    if isinstance(location, Location):
        loc = location
    elif not is_uri(location):
        s = os.fspath(location)
        if not s:
            raise CheckpointError(f"{what} location is empty")
        s = s[len("file://"):] if s.lower().startswith("file://") else s
        loc = Location(_LOCAL, os.path.abspath(os.path.expanduser(s)))
    else:
        loc = _remote(str(location), what, dict(storage_options or {}))
    if must_exist:
        with translated_errors(loc, what):
            loc.fs.info(loc.path)
    return loc


def discover_children(location, pattern: re.Pattern) -> List[Tuple[int, Location]]:
    """(step, child) for each child directory whose name matches `pattern` (group 1: the step),
    sorted by step (remote: one HEAD and one listing request)."""
    loc = locate(location, what="run directory")
    with translated_errors(loc, "run directory"):
        entries = loc.fs.ls(loc.path, detail=True)
    found = []
    for e in entries:
        name = e["name"].rstrip("/")
        m = pattern.match(posixpath.basename(name))
        if e["type"] == "directory" and m:
            found.append((int(m.group(1)), Location(loc.fs, name)))
    return sorted(found, key=lambda t: (t[0], t[1].name))


def checkpoint_id(location) -> str:
    """The string that names a location in run records: an absolute local path (symlinks
    resolved) or the URI as given, without contacting any store."""
    if isinstance(location, Location):
        return location.uri
    if is_uri(location):
        return str(location).rstrip("/")
    return str(Path(os.fspath(location)).expanduser().resolve())


def read_counter(reset: bool = False) -> Dict[str, int]:
    """Bytes read per URI (or local path) by read_range/read_bytes in this process; `reset`
    starts the count again after returning it."""
    with _read_lock:
        counts = dict(_read_bytes)
        if reset:
            _read_bytes.clear()
    return counts


def clear_instance_caches() -> None:
    """Forget cached fsspec filesystems so that the next `locate` reads the environment again.
    (fsspec caches per class: ``AbstractFileSystem.clear_instance_cache()`` misses S3FileSystem's.)"""
    for cls in registry.values():
        cls.clear_instance_cache()


# --- helpers ------------------------------------------------------------------------------


def _remote(uri: str, what: str, options: dict) -> Location:
    protocols = [fsspec.core.split_protocol(part)[0] or "file" for part in uri.split("::")]
    for proto in protocols:
        try:
            fsspec.get_filesystem_class(proto)
        except ValueError:
            known = fsspec.available_protocols()
            near = ", ".join(difflib.get_close_matches(proto, known, n=3)) or "s3, gs, az, hf, http"
            raise CheckpointError(f"{what} {redact(uri)}: unknown protocol '{proto}://' (did you "
                                  f"mean {near}? fsspec.available_protocols() lists all "
                                  f"{len(known)})") from None
        except ImportError:
            package = known_implementations[proto]["class"].split(".")[0]
            extra = "ckmerge-ray[remote]" if proto in _CREDENTIALS else package
            raise CheckpointError(f"{proto}:// needs the {package} package: pip install "
                                  f"'{extra}'") from None
    if protocols[-1] in ("s3", "s3a"):
        # botocore itself honours AWS_ENDPOINT_URL(_S3); passing it explicitly as well puts the
        # endpoint into the instance-cache key (another endpoint, another filesystem) and into
        # the pickled filesystem a Ray worker rebuilds, and lets errors name it.
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        configured = fsspec.config.conf.get(protocols[-1], {}).get("endpoint_url")
        ignored = os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
        if ep and not configured and not ignored and "endpoint_url" not in options \
                and "endpoint_url" not in options.get("client_kwargs", {}):
            options["endpoint_url"] = ep
    if protocols[-1] in _CREDENTIALS:
        # fsspec's listing cache would answer exists/info/fingerprint from a stale listing
        # after another process rewrote an object; checkpoints are few, so always ask.
        options.setdefault("use_listings_cache", False)
    with translated_errors(None, what, uri=uri):
        fs, path = fsspec.core.url_to_fs(uri, **options)
    return Location(fs, path.rstrip("/") or path)


@contextmanager
def translated_errors(loc: Optional[Location], what: str, uri: str = "", missing_ok: bool = False) -> Iterator[None]:
    """Turn what the filesystem library raised into a one-line CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised below unless recognised
        uri = redact(loc.uri if loc is not None else uri)
        proto = _protocol(loc.fs) if loc is not None else fsspec.core.split_protocol(uri)[0]
        chain, c = [], e
        while c is not None and len(chain) < 8:
            chain.append(c)
            c = c.__cause__ or c.__context__
        cred = next((c for c in chain if type(c).__name__ in _CREDENTIAL_ERRORS), None)
        lib, sources = _CREDENTIALS.get(proto, ("the filesystem library", "its usual environment"))
        if cred is not None:
            seen = [n for n in re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", sources) if os.environ.get(n)]
            raise CheckpointError(_scrub(
                f"no usable credentials for {what} {uri}: {lib} reported {type(cred).__name__}"
                f" ({cred}); it looks for {sources}. Set now: {', '.join(seen) or 'none of these'}"
            )) from None
        down = next((c for c in chain if type(c).__name__ in _UNREACHABLE_ERRORS), None)
        if down is not None:
            raise CheckpointError(_scrub(f"cannot reach {_endpoint(loc)} for {what} {uri}: {down}")) from e
        if isinstance(e, PermissionError) and loc is not None and loc.is_local:
            raise CheckpointError(f"permission denied for {what} {uri}: {e}") from e
        if isinstance(e, PermissionError):
            raise CheckpointError(_scrub(
                f"permission denied for {what} {uri} at {_endpoint(loc)}: {e}; the credentials "
                f"{lib} found ({sources}) are not allowed this request")) from e
        if isinstance(e, FileNotFoundError) and loc is not None and not missing_ok:
            raise CheckpointError(_scrub(_missing(loc, what))) from e
        raise


def _missing(loc: Location, what: str) -> str:
    """Why `loc` does not exist: its bucket is missing, or nothing is at its prefix."""
    if loc.is_local or _protocol(loc.fs) not in _CREDENTIALS:  # no buckets there
        return f"{what} {redact(loc.uri)} does not exist"
    bucket = loc.path.split("/", 1)[0]
    try:
        loc.fs.info(bucket)
    except FileNotFoundError:
        return (f"{what} {redact(loc.uri)}: bucket '{bucket}' does not exist (or is not visible "
                f"with these credentials) at {_endpoint(loc)}")
    except Exception:  # noqa: BLE001 - the first error is the one to report
        return f"{what} {redact(loc.uri)} does not exist (at {_endpoint(loc)})"
    try:
        near = ", ".join(c.name for c in loc.parent.listdir()[:8])
    except Exception:  # noqa: BLE001
        near = ""
    seen = f"; {redact(loc.parent.uri)}/ holds: {near}" if near else ""
    key = loc.path.split("/", 1)[1] if "/" in loc.path else ""
    return f"{what} {redact(loc.uri)} does not exist: bucket '{bucket}' has no object or prefix '{key}'{seen}"


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def _endpoint(loc: Optional[Location]) -> str:
    fs = loc.fs if loc is not None else None
    ep = getattr(fs, "endpoint_url", None) or getattr(fs, "client_kwargs", {}).get("endpoint_url")
    if ep:
        return f"endpoint {ep}"
    return "the default endpoint" if fs is None else f"{type(fs).__name__}'s default endpoint"


def _version(info: dict) -> tuple:
    keys = ("ETag", "LastModified", "generation", "md5Hash", "updated", "mtime", "etag")
    return (int(info.get("size") or 0), *(str(info[k]) for k in keys if info.get(k) is not None))


def _count(uri: str, n: int) -> None:
    with _read_lock:
        _read_bytes[uri] = _read_bytes.get(uri, 0) + n


def redact(uri: str) -> str:
    """A URI fit for a message: no password in ``user:pw@host``, no query (signed URLs)."""
    uri = re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", uri)
    return uri.split("?", 1)[0]


def _scrub(text: str) -> str:
    for name, value in os.environ.items():
        if value and len(value) >= 8 and _SECRET_NAME.search(name):
            text = text.replace(value, "***")
    return text
