"""Who may call the endpoint gateway, how often, and where its models may come from.

**API keys.** A keys file holds one client a line, ``<client-name> <key> [<role>]``, or
``<client-name> sha256:<hex digest of the key> [<role>]`` so that the file need not hold the key
itself; ``#`` starts a comment::

    airflow   sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  admin
    notebook  Zq3...a long random key...

Keys are kept as SHA-256 digests and compared with ``hmac.compare_digest``; a key is at least 16
characters. ``LLMOPS_GATEWAY_API_KEY`` alone defines one key, for the client ``default``, with the
role ``LLMOPS_GATEWAY_API_KEY_ROLE`` (default ``admin``: it is the operator's one key).

**Roles.** A key carries a role, and every route needs one (``ROLES``, least first): ``invoke``
(invocations), ``operate`` (reading endpoints and their metrics, changing traffic weights) and
``admin`` (models, endpoint configs and with them guardrail settings, endpoints). A role holds
the ones before it. A line without a role is ``invoke``: a key does no more than call models
unless its line says so.

**Rate limits.** A token bucket per client (its key's name, or its address when the gateway runs
without keys): ``rate`` requests a second, up to ``burst`` at once.

**Capture roots.** A data-capture destination (``DestinationS3Uri``, a folder or ``file://`` URI
on the local gateway) must lie inside one of the capture roots, judged after ``..`` and symbolic
links are resolved: callers choose prompts, and the gateway writes them only where it was told.

**Model store.** A model's ``ModelDataUrl`` must lie under one of the allowed roots (folders, or
``s3://bucket/prefix``), judged after ``..`` and symbolic links are resolved, and a model folder
may not hold a link that leads out; a ``ContainerUrl`` is a scheme, a host and a port only, and
the host must be loopback unless remote containers are allowed. The model's ``Environment`` may
not set what decides which code a model server runs (``LD_PRELOAD``, ``PYTHONPATH``...): like
SageMaker's, it is otherwise the model's own (the model server inherits only an allowlisted part
of the gateway's environment, ``serving.gateway.servers``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("llmops.gateway")

MIN_KEY_LENGTH = 16
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


ROLES = ("invoke", "operate", "admin")
DEFAULT_ROLE = "invoke"


def role_allows(held: str, needed: str) -> bool:
    """Whether a key of role ``held`` may call a route that needs ``needed``."""
    return ROLES.index(held) >= ROLES.index(needed)


class AccessConfigError(ValueError):
    """The gateway's access settings (keys file, store roots) are unusable; the message says where."""


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKey:
    digest: bytes
    role: str = DEFAULT_ROLE


class ApiKeys:
    """Client names by key digest, and each client's role. ``identify`` compares against every
    digest, so the time it takes does not depend on which key (if any) matched."""

    def __init__(self, digests: Mapping[str, bytes], roles: Mapping[str, str] | None = None):
        self._entries = tuple(digests.items())
        self._roles = {name: (roles or {}).get(name, DEFAULT_ROLE) for name in digests}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def clients(self) -> list[str]:
        return [name for name, _ in self._entries]

    def identify(self, presented: str | None) -> str | None:
        """The client a presented key belongs to, or None."""
        if not presented:
            return None
        digest = key_digest(presented)
        found = None
        for name, stored in self._entries:
            if hmac.compare_digest(digest, stored):
                found = name
        return found

    def role(self, client: str) -> str:
        return self._roles[client]

    @property
    def roles(self) -> dict[str, str]:
        return dict(self._roles)


def parse_api_keys(lines: Iterable[str], where: str) -> dict[str, ApiKey]:
    keys: dict[str, ApiKey] = {}
    for number, raw in enumerate(lines, start=1):
        # A comment starts a line or follows a space: a key may hold "#" itself.
        line = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            raise AccessConfigError(
                f"{where}:{number}: expected '<client-name> <key>' or '<client-name> sha256:<hex>', then"
                f" optionally a role ({', '.join(ROLES)})"
            )
        name, secret, role = (*parts, DEFAULT_ROLE) if len(parts) == 2 else parts
        if role not in ROLES:  # never echoed: a misplaced field may be the key itself
            raise AccessConfigError(
                f"{where}:{number}: expected '<client-name> <key>' or '<client-name> sha256:<hex>', then"
                f" optionally a role; the third field is not one of {', '.join(ROLES)}"
            )
        if not _CLIENT_NAME.match(name):
            raise AccessConfigError(f"{where}:{number}: client name {name!r} must be 1-64 letters, digits, . _ -")
        if name in keys:
            raise AccessConfigError(f"{where}:{number}: client {name} appears twice")
        match = _DIGEST.match(secret)
        if match:
            digest = bytes.fromhex(match.group(1))
        elif len(secret) < MIN_KEY_LENGTH:
            raise AccessConfigError(
                f"{where}:{number}: the key of client {name} has {len(secret)} characters; at least"
                f" {MIN_KEY_LENGTH} are required"
            )
        else:
            digest = key_digest(secret)
        if any(digest == known.digest for known in keys.values()):
            raise AccessConfigError(f"{where}:{number}: client {name} has the same key as another client")
        keys[name] = ApiKey(digest, role)
    return keys


def load_api_keys(keys_file: str | None, environ: Mapping[str, str] = os.environ) -> ApiKeys:
    """The keys of ``keys_file`` (else ``LLMOPS_GATEWAY_API_KEYS_FILE``), plus
    ``LLMOPS_GATEWAY_API_KEY`` as the client ``default`` (role ``LLMOPS_GATEWAY_API_KEY_ROLE``)."""
    keys: dict[str, ApiKey] = {}
    keys_file = keys_file or environ.get("LLMOPS_GATEWAY_API_KEYS_FILE") or None
    if keys_file:
        path = Path(keys_file)
        try:
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except OSError as exc:
            raise AccessConfigError(f"API keys file {path}: {exc.strerror or exc}") from None
        if mode & 0o077:
            log.warning("API keys file %s can be read by other users (mode %o): chmod 600 it", path, mode & 0o777)
        keys.update(parse_api_keys(text.splitlines(), str(path)))
    single = environ.get("LLMOPS_GATEWAY_API_KEY", "").strip()
    if single:
        role = environ.get("LLMOPS_GATEWAY_API_KEY_ROLE", "").strip() or "admin"
        if role not in ROLES:
            raise AccessConfigError(f"LLMOPS_GATEWAY_API_KEY_ROLE: {role!r} is not one of {', '.join(ROLES)}")
        more = parse_api_keys([f"default {single} {role}"], "LLMOPS_GATEWAY_API_KEY")
        if "default" in keys:
            raise AccessConfigError("LLMOPS_GATEWAY_API_KEY and the keys file both define the client 'default'")
        if any(more["default"].digest == known.digest for known in keys.values()):
            raise AccessConfigError("LLMOPS_GATEWAY_API_KEY is also a key of the keys file")
        keys.update(more)
    return ApiKeys({name: key.digest for name, key in keys.items()}, {name: key.role for name, key in keys.items()})


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request presents: ``x-api-key``, else ``Authorization: Bearer <key>`` (an SDK's
    SigV4 ``Authorization`` is no key: boto3 clients send ``x-api-key``)."""
    bearer = None
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
    return bearer


class RateLimiter:
    """A token bucket per client: ``rate`` requests a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: float | None = None, max_clients: int = 10_000, clock=time.monotonic):
        if rate <= 0:
            raise ValueError(f"the rate limit must be above 0 requests a second, got {rate:g}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        if self.burst < 1:
            raise ValueError(f"the burst must allow at least 1 request, got {self.burst:g}")
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when counted)
        self._max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()

    def acquire(self, client: str) -> float:
        """0 when the request may go now (it takes a token), else the seconds until it may."""
        now = self._clock()
        with self._lock:
            # Popped and put back: the table stays ordered from the least recently seen client.
            tokens, then = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                wait = 0.0
            else:
                self._buckets[client] = (tokens, now)
                wait = (1 - tokens) / self.rate
            if len(self._buckets) > self._max_clients:
                self._forget_oldest()
            return wait

    def _forget_oldest(self) -> None:
        # Down to 90% of the cap, least recently seen first, so a flood of addresses costs O(1) a
        # request and bounded memory. A forgotten bucket that had not refilled yet gives its client
        # a fresh burst: under such a flood, bounded memory matters more.
        while len(self._buckets) > self._max_clients * 0.9:
            del self._buckets[next(iter(self._buckets))]


# -- where models come from -----------------------------------------------------------------------

# Variables that decide which code, libraries and model files a model server process loads, and
# the limits it loads them under: the operator's settings, never a model's.
_LOADER_VARIABLES = re.compile(
    r"^(?:LD_|DYLD_|PYTHON|SAGEMAKER_BIND_TO_PORT$|SM_MODEL_DIR$|PORT$|LLMOPS_SERVING_HOST$|LLMOPS_SERVING_FD$"
    r"|LLMOPS_BASE_MODEL$|LLMOPS_BASE_MODEL_ROOTS$|LLMOPS_MODELS_DIR$|LLMOPS_HOME$|LLMOPS_MAX_MODEL_"
    r"|LLMOPS_MAX_NEW_TOKENS$|LLMOPS_MAX_INPUT_TOKENS$)"
)
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
_MAX_FOLDER_ENTRIES = 10_000


class SourceRefused(ValueError):
    """A model's source is not allowed; the message names it and what is."""


@dataclass(frozen=True)
class _S3Root:
    bucket: str
    prefix: str  # no leading or trailing slash; "" is the whole bucket

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def holds(self, bucket: str, key: str) -> bool:
        return bucket == self.bucket and (not self.prefix or key.startswith(self.prefix + "/"))


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


class ModelStore:
    """The roots a model may load from, and whether a ``ContainerUrl`` may leave this machine."""

    def __init__(self, roots: Sequence[str], allow_remote_containers: bool = False):
        if not roots:
            raise AccessConfigError("the gateway needs at least one model store root")
        self.local: list[Path] = []
        self.s3: list[_S3Root] = []
        for root in roots:
            root = root.strip()
            if root.startswith("s3://"):
                bucket, prefix = _split_s3(root)
                if not bucket or any(part in (".", "..") for part in prefix.split("/")):
                    raise AccessConfigError(f"model store root {root!r} is not an s3://bucket/prefix URI")
                self.s3.append(_S3Root(bucket, prefix.strip("/")))
            elif root.startswith("file://") or "://" not in root:
                self.local.append(_local(root).resolve())
            else:
                raise AccessConfigError(f"model store root {root!r}: a folder, file:// or s3:// URI")
        self.allow_remote_containers = allow_remote_containers

    @property
    def roots(self) -> list[str]:
        return [str(p) for p in self.local] + [str(r) for r in self.s3]

    def _refuse(self, model: str, url: str, why: str) -> SourceRefused:
        return SourceRefused(
            f"model {model}: ModelDataUrl {url} {why}; models load only from the model store"
            f" (allowed roots: {', '.join(self.roots)})"
        )

    def _inside(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.local)

    def local_source(self, model: str, url: str) -> Path:
        """The resolved path of a local ``ModelDataUrl``, once it is known to lie in the store."""
        if not url.startswith("file://") and "://" in url:
            raise self._refuse(model, url, "is not a local path")
        given = _local(url)
        resolved = given.resolve()
        if not self._inside(resolved):
            how = "is" if resolved == Path(os.path.abspath(given)) else f"resolves to {resolved}, which is"
            raise self._refuse(model, url, f"{how} outside the store")
        if resolved.is_dir():
            self._check_folder(model, url, resolved)
        return resolved

    def _check_folder(self, model: str, url: str, folder: Path) -> None:
        seen = 0
        for current, folders, files in os.walk(folder, followlinks=False):
            for name in (*folders, *files):
                seen += 1
                if seen > _MAX_FOLDER_ENTRIES:
                    raise self._refuse(model, url, f"holds more than {_MAX_FOLDER_ENTRIES} files")
                entry = Path(current) / name
                if entry.is_symlink() and not self._inside(entry.resolve()):
                    raise self._refuse(model, url, f"holds {entry}, a link to {entry.resolve()} outside the store")

    def check_s3(self, model: str, url: str) -> None:
        bucket, key = _split_s3(url)
        if not bucket or not key or any(part in ("", ".", "..") for part in key.split("/")):
            raise self._refuse(model, url, "is not an s3://bucket/key URI of an object")
        if not any(root.holds(bucket, key) for root in self.s3):
            raise self._refuse(model, url, "is outside the store")

    def check_model_data(self, model: str, url: str) -> Path | None:
        """``SourceRefused`` unless ``url`` lies in the store; the resolved path of a local one, None for S3."""
        if url.startswith("s3://"):
            self.check_s3(model, url)
            return None
        if url.startswith("file://") or "://" not in url:
            return self.local_source(model, url)
        raise self._refuse(model, url, f"has the scheme {url.split('://', 1)[0]}:// (allowed: file://, s3://)")

    def check_container_url(self, model: str, url: str) -> None:
        """A ``ContainerUrl`` is a scheme, a host and a port, nothing else: the gateway appends
        ``/ping`` and ``/invocations`` to it, and a path or query of the caller's choosing would
        point those calls at another service on the host. The host must be loopback unless
        remote containers are allowed."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise SourceRefused(f"model {model}: ContainerUrl {url!r} is not a URL") from None
        extra = [
            name
            for name, value in (
                ("a path", parts.path not in ("", "/")),
                ("a query", bool(parts.query)),
                ("a fragment", bool(parts.fragment)),
                ("credentials", parts.username is not None or parts.password is not None),
            )
            if value
        ]
        if parts.scheme not in ("http", "https") or not parts.hostname or extra:
            why = "needs http:// or https:// and a host" if parts.scheme not in ("http", "https") else ""
            why = why or (f"has {', '.join(extra)}" if extra else "needs a host")
            raise SourceRefused(
                f"model {model}: ContainerUrl {url!r} {why}; it is http[s]://<host>[:<port>] and nothing else"
            )
        if self.allow_remote_containers:
            return
        host = parts.hostname.lower()
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host in _LOOPBACK_NAMES
        if not loopback:
            raise SourceRefused(
                f"model {model}: ContainerUrl {url} is not on this machine (loopback); start the gateway with"
                " --allow-remote-containers to serve models from other hosts"
            )

    @staticmethod
    def check_environment(model: str, environment: Mapping[str, str]) -> None:
        refused = sorted(name for name in environment if _LOADER_VARIABLES.match(name))
        if refused:
            raise SourceRefused(
                f"model {model}: the Environment may not set {', '.join(refused)} (they decide what code and model"
                " files the model server loads, and under which limits: the gateway's settings)"
            )


class CaptureRoots:
    """The folders data capture may write under (``--capture-root``)."""

    def __init__(self, roots: Sequence[str]):
        if not roots:
            raise AccessConfigError("no capture root: give --capture-root (or LLMOPS_GATEWAY_CAPTURE_ROOT)")
        self.paths: list[Path] = []
        for root in roots:
            if "://" in root and not root.startswith("file://"):
                raise AccessConfigError(f"capture root {root!r}: the local gateway captures to a folder or file:// URI")
            self.paths.append(_local(root).resolve())

    @property
    def roots(self) -> list[str]:
        return [str(p) for p in self.paths]

    def check(self, config: str, destination: str) -> Path:
        """The resolved folder of ``destination``; ``SourceRefused`` when it is not a local folder
        inside a capture root (``..`` and links resolved first, so neither leads out)."""
        if destination.startswith("s3://") or ("://" in destination and not destination.startswith("file://")):
            raise SourceRefused(
                f"endpoint config {config}: the local gateway captures to a folder or a file:// URI,"
                f" not {destination!r}"
            )
        folder = _local(destination)
        if not folder.is_absolute():
            raise SourceRefused(
                f"endpoint config {config}: capture destination {destination!r} is not an absolute path"
            )
        resolved = folder.resolve()
        if not any(resolved == root or root in resolved.parents for root in self.paths):
            raise SourceRefused(
                f"endpoint config {config}: capture destination {destination} (resolved: {resolved}) is outside the"
                f" capture roots ({', '.join(self.roots)}); start the gateway with --capture-root to allow another"
            )
        return resolved
