"""The corpus catalog: named corpora, fetched on demand and verified by sha256, and where they live.

The catalog is the data file corpora/catalog.json, installed as the package data
charlm.corpora. A download goes to NAME.txt.part beside its destination; the sha256 of what
arrived is checked, the entry's normalisation steps are applied, the sha256 of the result is
checked, and only then is the file renamed to NAME.txt (a rename within one directory is
atomic), so NAME.txt is either absent or verified. Every failure, Ctrl-C included, removes the
.part file and raises one CharlmError line. Machines without internet set CHARLM_CORPUS_MIRROR
to a directory or base URL that holds the final files as NAME.txt; those are checked against
the final sha256 the same way. Generated entries (the binary-addition task) need no network.

Nothing here imports JAX, so `charlm corpus` answers at once.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.resources
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tqdm.auto import tqdm

from charlm.data import addition
from charlm.data.text import sha256_file
from charlm.errors import CharlmError
from charlm.storage import cache_dir, replace_durably, write_atomic, write_synced

DATA_DIR_VARIABLE = "CHARLM_DATA_DIR"
MIRROR_VARIABLE = "CHARLM_CORPUS_MIRROR"
DEFAULT_TIMEOUT = 60.0
_BLOCK = 1 << 16

# How each generated entry makes its text from its options.
GENERATORS: dict[str, Callable[..., str]] = {"addition": addition.corpus_text}


@dataclass(frozen=True)
class Entry:
    """One corpus of the catalog.

    A downloaded entry has a `url` pinned to an immutable revision, the sha256 and size of the
    download, its normalisation steps, and the sha256, size and character counts of the
    result. A generated entry has `generated` set and the `defaults` of its options.
    """

    name: str
    description: str
    language: str
    licence: str
    url: str | None = None
    download_sha256: str | None = None
    download_size: int | None = None
    normalise: tuple[Mapping[str, Any], ...] = ()
    sha256: str | None = None
    size: int | None = None
    characters: int | None = None
    distinct_characters: int | None = None
    generated: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Fetched:
    """A corpus in place: its path, size and sha256, and where it came from (a URL, a mirror,
    already here, or the options it was generated with)."""

    path: Path
    size: int
    sha256: str
    origin: str


def load_catalog() -> dict[str, Entry]:
    """The catalog's entries by name, in the order of corpora/catalog.json."""
    resource = importlib.resources.files("charlm.corpora").joinpath("catalog.json")
    document = json.loads(resource.read_text(encoding="utf-8"))
    entries = {}
    for item in document["corpora"]:
        entry = Entry(**{**item, "normalise": tuple(item.get("normalise", ()))})
        entries[entry.name] = entry
    return entries


def data_dir() -> Path:
    """Where catalog corpora live: $CHARLM_DATA_DIR, else $XDG_CACHE_HOME/charlm/corpora
    (~/.cache/charlm/corpora), beside the compilation cache of the CLI."""
    if os.environ.get(DATA_DIR_VARIABLE):
        return Path(os.environ[DATA_DIR_VARIABLE]).expanduser()
    return cache_dir() / "corpora"


def local_path(name: str) -> Path:
    """The file where the catalog corpus `name` is kept, present or not."""
    return data_dir() / f"{name}.txt"


def local_state(entry: Entry) -> str:
    """Whether the corpus is here: "missing", "present" (a download must also have the
    catalog's sha256) or "modified"."""
    path = local_path(entry.name)
    if not path.is_file():
        return "missing"
    if entry.generated or sha256_file(path) == entry.sha256:
        return "present"
    return "modified"


def drop_lines_before_prefix(data: bytes, prefix: str) -> bytes:
    """Drop every line before the first line that starts with `prefix` (for 三国演义, the
    modern editorial header before 第一回); every byte from that line on is kept."""
    marker = prefix.encode("utf-8")
    if data.startswith(marker):
        return data
    index = data.find(b"\n" + marker)
    if index < 0:
        raise CharlmError(f"no line starts with {prefix!r}, so the header cannot be dropped")
    return data[index + 1 :]


# The normalisation steps a catalog entry may name, each applied as step(data, argument).
NORMALISATIONS: dict[str, Callable[[bytes, Any], bytes]] = {
    "drop_lines_before_prefix": drop_lines_before_prefix,
}


def normalise(data: bytes, steps: tuple[Mapping[str, Any], ...]) -> bytes:
    """Apply a catalog entry's normalisation steps, in order, to the downloaded bytes."""
    for step in steps:
        for name, argument in step.items():
            if name not in NORMALISATIONS:
                raise CharlmError(
                    f"the catalog asks for the normalisation step {name!r}, which this charlm "
                    "does not know; upgrade charlm"
                )
            data = NORMALISATIONS[name](data, argument)
    return data


def _entry(name: str, catalog: Mapping[str, Entry]) -> Entry:
    if name not in catalog:
        raise CharlmError(
            f"no corpus named {name!r} in the catalog; the names are {', '.join(catalog)}"
        )
    return catalog[name]


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _mirror_location(mirror: str, name: str) -> str:
    """NAME.txt in the mirror directory or under the mirror base URL."""
    if _is_url(mirror):
        return f"{mirror.rstrip('/')}/{urllib.parse.quote(name)}.txt"
    return str(Path(mirror).expanduser() / f"{name}.txt")


@contextmanager
def _open(location: str, timeout: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """A URL or a file, opened for reading, and its length in bytes when known."""
    if not _is_url(location):
        if not Path(location).is_file():
            raise CharlmError(f"the mirror has no {Path(location).name}: {location} is missing")
        with open(location, "rb") as f:
            yield f, os.fstat(f.fileno()).st_size
        return
    with urllib.request.urlopen(location, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        yield response, int(length) if length and length.isdigit() else None


class _Truncated(Exception):
    """A transfer ended before the length its server announced."""


def _copy(source: BinaryIO, part: Path, total: int | None, label: str, progress: bool) -> str:
    """Copy `source` into `part` with a progress bar; the sha256 of the bytes written. A
    stream shorter than the length its server announced is an error."""
    digest = hashlib.sha256()
    received = 0
    with (
        open(part, "wb") as out,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=not progress,
            file=sys.stderr,
        ) as bar,
    ):
        while block := source.read(_BLOCK):
            out.write(block)
            digest.update(block)
            received += len(block)
            bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())
    if total is not None and received != total:
        raise _Truncated(f"{received:,} of {total:,} bytes")
    return digest.hexdigest()


@contextmanager
def _one_line_failures(name: str, location: str, timeout: float, hint: str) -> Iterator[None]:
    """Turn every way a transfer can fail, Ctrl-C included, into one CharlmError line that
    ends with `hint`, what to do about it."""
    try:
        yield
    except urllib.error.HTTPError as err:
        raise CharlmError(
            f"could not download {name}: HTTP {err.code} {err.reason} from {location}; {hint}"
        ) from None
    except (TimeoutError, urllib.error.URLError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            raise CharlmError(
                f"could not download {name}: {location} sent nothing for {timeout:g} s "
                f"(timed out); {hint}"
            ) from None
        raise CharlmError(f"could not download {name} from {location}: {reason}; {hint}") from None
    except (_Truncated, http.client.IncompleteRead) as err:
        raise CharlmError(
            f"could not download {name}: the connection to {location} closed early ({err}); {hint}"
        ) from None
    except (OSError, http.client.HTTPException) as err:
        raise CharlmError(f"could not fetch {name} from {location}: {err}; {hint}") from None
    except KeyboardInterrupt:
        raise CharlmError(f"the download of {name} was interrupted; nothing was kept") from None


def _check(name: str, location: str, what: str, digest: str, expected: str | None) -> None:
    if digest != expected:
        raise CharlmError(
            f"{name}: the sha256 of {what} from {location} is {digest[:16]}…, not the "
            f"catalog's {(expected or '')[:16]}…; nothing was kept"
        )


def _download(entry: Entry, dest: Path, timeout: float, progress: bool) -> Fetched:
    """Fetch `entry` from its URL (or the mirror), verify and normalise it, then install it."""
    mirror = os.environ.get(MIRROR_VARIABLE)
    location = _mirror_location(mirror, entry.name) if mirror else str(entry.url)
    part = dest.with_name(f"{dest.name}.part")
    hint = (
        f"check {MIRROR_VARIABLE}"
        if mirror
        else f"try again, or set {MIRROR_VARIABLE} to a directory or URL that holds {entry.name}.txt"
    )
    try:
        with _one_line_failures(entry.name, location, timeout, hint):
            with _open(location, timeout) as (source, total):
                digest = _copy(source, part, total, entry.name, progress)
            if not mirror:  # a mirror holds the final file, already normalised
                _check(entry.name, location, "the download", digest, entry.download_sha256)
                if entry.normalise:
                    data = normalise(part.read_bytes(), entry.normalise)
                    write_synced(part, data)
                    digest = hashlib.sha256(data).hexdigest()
            _check(entry.name, location, "the corpus", digest, entry.sha256)
            replace_durably(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return Fetched(dest, dest.stat().st_size, digest, f"from {location}, sha256 verified")


def _generate(entry: Entry, dest: Path, options: Mapping[str, Any]) -> Fetched:
    """Write the generated corpus `entry` with its default options overridden by `options`."""
    settings = {**entry.defaults, **options}
    data = GENERATORS[entry.name](**settings).encode("utf-8")
    write_atomic(dest, data)
    described = ", ".join(f"{key}={value}" for key, value in sorted(settings.items()))
    return Fetched(dest, len(data), hashlib.sha256(data).hexdigest(), f"generated with {described}")


def get(
    name: str,
    *,
    catalog: Mapping[str, Entry] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
    **options: Any,
) -> Fetched:
    """Put the catalog corpus `name` in place and say where it is.

    A downloaded corpus already present with the catalog's sha256 is kept; otherwise it is
    fetched (from $CHARLM_CORPUS_MIRROR when set), with `timeout` seconds allowed for each
    network wait. A generated corpus is (re)written with `options` (for addition: lines, bits,
    seed) over its defaults. Raises CharlmError, leaving no file behind, on any failure.
    """
    catalog = load_catalog() if catalog is None else catalog
    entry = _entry(name, catalog)
    dest = local_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    named = ", ".join(f"--{key}" for key in sorted(set(options) - set(entry.defaults)))
    if named and entry.generated:
        raise CharlmError(f"{name} has no option {named}")
    if named:
        raise CharlmError(f"{name} is downloaded, not generated; {named} apply only to addition")
    if entry.generated:
        return _generate(entry, dest, options)
    if dest.is_file():
        digest = sha256_file(dest)
        if digest == entry.sha256:
            return Fetched(dest, dest.stat().st_size, digest, "already here, sha256 verified")
    return _download(entry, dest, timeout, progress)


def resolve_corpus(arg: str, *, timeout: float = DEFAULT_TIMEOUT, progress: bool = True) -> str:
    """The text file that `arg` names: an existing path as it is, else the local copy of the
    catalog corpus of that name, fetched (or generated with its defaults) if not here yet."""
    if Path(arg).exists():
        return arg
    catalog = load_catalog()
    if arg not in catalog:
        raise CharlmError(
            f"no such file: {arg}, nor a catalog corpus of that name "
            f"({', '.join(catalog)}; see charlm corpus list)"
        )
    path = local_path(arg)
    if not path.is_file():
        path = get(arg, catalog=catalog, timeout=timeout, progress=progress).path
    return str(path)
