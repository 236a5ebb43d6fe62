"""Find kernel headers BCC can compile against, also on kernels without a headers package.

BCC looks for `/lib/modules/$(uname -r)/build`. Custom and cloud kernels often have none,
but the flow program only needs UAPI types, so the distribution's headers for another
version work. Debian splits them into an arch dir and a `-common` dir; BCC needs one
tree, so we build a merged tree of symlinks in a cache dir (never touching
`/lib/modules`) and point `BCC_KERNEL_SOURCE` at it.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mermin_cli.errors import MerminError

log = logging.getLogger("mermin.engine")

SRC_ROOT = Path("/usr/src")
MODULES_ROOT = Path("/lib/modules")


@dataclass(frozen=True)
class HeaderTree:
    """The header tree BCC will use and where it came from."""

    path: Path
    origin: str  # "running kernel", "BCC_KERNEL_SOURCE" or "merged <pkg dirs>"
    matches_kernel: bool


def cache_dir() -> Path:
    """Where derived artefacts live: $MERMIN_CACHE_DIR, else /var/cache/mermin as root."""
    if env := os.environ.get("MERMIN_CACHE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/mermin")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mermin"


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _distro_header_dirs() -> tuple[Path, Path | None] | None:
    """Newest `linux-headers-*` arch dir for this machine and its `-common` companion."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    candidates = [
        d
        for d in SRC_ROOT.glob("linux-headers-*")
        if d.is_dir() and (d / "include").is_dir() and not d.name.endswith("-common")
    ]
    if not candidates:
        return None
    preferred = [d for d in candidates if d.name.endswith(f"-{arch}")] or candidates
    build = max(preferred, key=lambda d: _version_key(d.name))
    common = build.with_name(re.sub(r"-[^-]+$", "-common", build.name))
    return build, (common if common.is_dir() and common != build else None)


def _merge(sources: list[Path], dest: Path) -> None:
    """Mirror `sources` into `dest` as symlinks; later sources win (arch over common)."""
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        for src in sources:
            for dirpath, _dirnames, filenames in os.walk(src):
                rel = Path(dirpath).relative_to(src)
                (tmp / rel).mkdir(parents=True, exist_ok=True)
                for name in filenames:
                    link = tmp / rel / name
                    if link.is_symlink() or link.exists():
                        link.unlink()
                    link.symlink_to(Path(dirpath) / name)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_header_tree() -> HeaderTree:
    """Return a header tree for BCC, building the merged tree on first use."""
    release = platform.release()
    if env := os.environ.get("BCC_KERNEL_SOURCE"):
        return HeaderTree(Path(env), "BCC_KERNEL_SOURCE", matches_kernel=False)
    for sub in ("build", "source"):
        path = MODULES_ROOT / release / sub
        if (path / "include").is_dir():
            return HeaderTree(path, "running kernel", matches_kernel=True)
    found = _distro_header_dirs()
    if found is None:
        raise MerminError(
            f"No kernel headers found for kernel {release} and none in {SRC_ROOT}; "
            "install the distribution's headers (Debian: apt-get install linux-headers-amd64)."
        )
    build, common = found
    sources = [common, build] if common else [build]
    dest = cache_dir() / "kernel-headers" / build.name
    stamp = dest / ".mermin-complete"
    if not stamp.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _merge(sources, dest)
        stamp.write_text(" ".join(str(s) for s in sources) + "\n")
    return HeaderTree(dest, "merged " + " + ".join(s.name for s in sources), matches_kernel=False)


def prepare_bcc_headers() -> HeaderTree:
    """Point BCC at a usable header tree (sets BCC_KERNEL_SOURCE when needed), say so once."""
    tree = find_header_tree()
    if not tree.matches_kernel and tree.origin != "BCC_KERNEL_SOURCE":
        os.environ["BCC_KERNEL_SOURCE"] = str(tree.path)
        log.info(
            "no headers for kernel %s; compiling against %s (%s)",
            platform.release(),
            tree.path,
            tree.origin,
        )
    return tree
