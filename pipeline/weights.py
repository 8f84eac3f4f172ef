"""What a task's weights are, hashed: the key a folder's manifest and a worker's model cache use
to tell that the weights changed.

``weights_digest(task)`` is {file name: sha256} over the files ``models.load(task)`` reads. For a
.safetensors file the sha256 is over its tensors only (``_hash_tensors``), so rewriting the model
card kept in the file's header changes nothing; ``weights_file_digest`` is over the files' bytes,
what records written before held. Each file is hashed once per process for each (path, size,
mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_digests: dict[tuple, str] = {}
_digests_lock = threading.Lock()


def weights_files(task: str) -> list[Path]:
    """The files ``models.load(task)`` reads: a restoration task's network, FaceMath's VAE and
    its attribute vectors; none for identity."""
    from models.tasks import resolve

    spec = resolve(task)
    if spec.weights is None:
        return []
    from models import registry

    files = [registry.WEIGHTS_DIR / spec.weights]
    if spec.latent:
        files.append(registry.WEIGHTS_DIR / "facemath.attrs.safetensors")
    return files


def hash_file(path: Path) -> str:
    """The sha256 (hex) of a file's bytes, read now (``file_sha256`` keeps it per process)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_tensors(path: Path) -> str | None:
    """sha256 over a .safetensors file's tensors (each one's name, dtype, shape and bytes, in
    name order), leaving out the header's ``__metadata__``: the model card a card refresh
    rewrites does not change what the network computes. None when the file is not safetensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        n = int.from_bytes(head, "little")
        if not 2 <= n <= min(size - 8, 100 << 20):
            return None
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return None
        if not isinstance(header, dict):
            return None
        header.pop("__metadata__", None)
        h = hashlib.sha256(b"facemend-tensors-1")
        try:
            for name in sorted(header):
                t = header[name]
                start, end = (int(x) for x in t["data_offsets"])
                h.update(json.dumps([name, t["dtype"], t["shape"]]).encode())
                f.seek(8 + n + start)
                left = end - start
                while left > 0:
                    block = f.read(min(left, 1 << 20))
                    if not block:
                        return None
                    h.update(block)
                    left -= len(block)
        except (KeyError, TypeError, ValueError):
            return None
    return h.hexdigest()


def _cached(kind: str, path: Path, fn) -> str:
    st = os.stat(path)
    key = (kind, str(path), st.st_size, st.st_mtime_ns)
    with _digests_lock:
        if key in _digests:
            return _digests[key]
    value = fn(path)
    with _digests_lock:
        _digests[key] = value
    return value


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, hashed once per process for each (path, size, mtime)."""
    return _cached("file", path, hash_file)


def weights_sha256(path: Path) -> str:
    """What a weights file computes, hashed: the sha256 of its tensors (``_hash_tensors``) for
    a .safetensors file, so that rewriting the card in its header changes nothing; of its bytes
    for any other file. Once per process for each (path, size, mtime)."""
    return _cached("tensors", path, lambda p: _hash_tensors(p) or hash_file(p))


def _digest(task: str, fn) -> dict[str, str]:
    out = {}
    for p in weights_files(task):
        try:
            out[p.name] = fn(p)
        except OSError:
            out[p.name] = "missing"
    return out


def weights_digest(task: str) -> dict[str, str]:
    """{file name: ``weights_sha256``} of the weights ``task`` loads ({} for identity; a missing
    file has the digest "missing", and the job's model load reports it)."""
    return _digest(task, weights_sha256)


def weights_file_digest(task: str) -> dict[str, str]:
    """{file name: sha256 of the file's bytes}: what records written before ``weights_digest``
    hashed tensors hold. A record with it still counts as made with the same weights."""
    return _digest(task, file_sha256)
