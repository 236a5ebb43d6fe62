#!/usr/bin/env bash
# Install what mermin needs on Debian/Ubuntu and prepare .venv/ in the checkout.
# Idempotent and quick when everything is present: it checks first and only then runs
# apt-get / pip. Needs root only when system packages are missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.mermin-pyproject.sha256"
BCC_SRC=/usr/lib/python3/dist-packages/bcc
LOG="$(mktemp -t mermin-setup.XXXXXX)"
trap 'rm -f "$LOG"' EXIT
did=()

die() {
  printf 'setup: %s\n' "$*" >&2
  exit 1
}
fail_with_log() {
  printf 'setup: %s failed; its output follows.\n' "$1" >&2
  tail -n 40 "$LOG" >&2 || true
  exit 1
}
is_root() { [[ "$(id -u)" -eq 0 ]]; }

# Is this interpreter >= 3.10 and able to make a venv with pip?
py_can_venv() {
  "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1
}
venv_healthy() {
  [[ -x "$VENV/bin/python" ]] &&
    "$VENV/bin/python" -c 'import sys, pip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1
}

# --- 1. what is missing -----------------------------------------------------------------
arch="$(dpkg --print-architecture)"
headers="linux-headers-$arch"
# Ubuntu names its headers metapackage after the kernel flavour, not the architecture.
if grep -qsE '^(ID|ID_LIKE)=.*ubuntu' /etc/os-release; then headers=linux-headers-generic; fi
pkgs=(python3-bpfcc "$headers" iproute2 iputils-ping tcpdump iperf3 bpftool libcap2-bin procps tmux)

# A distribution kernel also gets its exact headers (custom kernels rely on the loader's
# fallback to the metapackage's header tree).
kver="$(uname -r)"
if [[ ! -e "/lib/modules/$kver/build" ]] &&
  [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "linux-image-$kver" 2>/dev/null)" == ii* ]]; then
  pkgs+=("linux-headers-$kver")
fi

rebuild_venv=false
venv_healthy || rebuild_venv=true
PY=""
if $rebuild_venv; then
  if cand="$(command -v python3)" && py_can_venv "$cand"; then
    PY="$cand"
  else
    PY=/usr/bin/python3
    if [[ ! -x "$PY" ]] || ! py_can_venv "$PY"; then pkgs+=(python3-venv); fi
  fi
fi

declare -A installed=()
while read -r name status; do
  [[ "$status" == ii* ]] && installed["${name%%:*}"]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${pkgs[@]}" 2>/dev/null || true)
missing=()
for p in "${pkgs[@]}"; do
  [[ -n "${installed[$p]:-}" ]] || missing+=("$p")
done

# --- 2. system packages -----------------------------------------------------------------
if ((${#missing[@]})); then
  is_root || die "missing system packages (${missing[*]}): re-run with sudo, e.g. 'sudo make setup'."
  apt-get update -qq >"$LOG" 2>&1 || fail_with_log "apt-get update"
  avail=()
  for p in "${missing[@]}"; do
    if apt-cache show --no-all-versions "$p" >/dev/null 2>&1; then
      avail+=("$p")
    elif [[ "$p" == python3-bpfcc || "$p" == "$headers" || "$p" == iproute2 ]]; then
      die "package $p is not available from this machine's apt sources; enable the main archive and retry."
    else
      printf 'setup: warning: %s is not available here; skipping it.\n' "$p" >&2
    fi
  done
  if ((${#avail[@]})); then
    apt-get install -y -qq --no-install-recommends "${avail[@]}" >"$LOG" 2>&1 ||
      fail_with_log "apt-get install ${avail[*]}"
    did+=("installed ${avail[*]}")
  fi
fi

# --- 3. the virtualenv ------------------------------------------------------------------
writable_or_die() {
  [[ -w "$1" ]] || die "cannot write to $1 (made by another user?): re-run with sudo, e.g. 'sudo make setup'."
}
if $rebuild_venv; then
  py_can_venv "$PY" || die "$PY cannot create a virtualenv (needs Python >= 3.10 with venv): install python3-venv and retry."
  if [[ -e "$VENV" ]]; then
    writable_or_die "$VENV"
    rm -rf -- "$VENV"
    did+=("recreated broken .venv")
  else
    writable_or_die "$ROOT"
    did+=("created .venv with $("$PY" -c 'import sys; print("python%d.%d" % sys.version_info[:2])')")
  fi
  "$PY" -m venv "$VENV" >"$LOG" 2>&1 || fail_with_log "$PY -m venv .venv"
fi

# Only bcc is taken from the system (below): never the whole dist-packages.
if grep -qiE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg"; then
  writable_or_die "$VENV/pyvenv.cfg"
  sed -i -E 's/^(include-system-site-packages *= *).*/\1false/I' "$VENV/pyvenv.cfg"
  did+=("turned off system site-packages")
fi

want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" || ! -x "$VENV/bin/mermin" ]]; then
  writable_or_die "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' >"$LOG" 2>&1 ||
    fail_with_log "pip install -e '.[test]'"
  printf '%s\n' "$want" >"$STAMP"
  did+=("installed mermin and test deps into .venv")
fi

purelib="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
# The PyPI project named "bcc" is unrelated to BCC; remove it if something pulled it in.
if compgen -G "$purelib/bcc-*.dist-info" >/dev/null; then
  writable_or_die "$purelib"
  "$VENV/bin/python" -m pip uninstall -y -q bcc >"$LOG" 2>&1 || fail_with_log "pip uninstall bcc"
  did+=("removed the unrelated PyPI package bcc")
fi
[[ -d "$BCC_SRC" ]] || die "$BCC_SRC is missing although python3-bpfcc is installed: reinstall it with 'sudo apt-get install --reinstall python3-bpfcc'."
if [[ "$(readlink "$purelib/bcc" 2>/dev/null || true)" != "$BCC_SRC" ]]; then
  writable_or_die "$purelib"
  rm -rf -- "${purelib:?}/bcc"
  ln -s "$BCC_SRC" "$purelib/bcc"
  did+=("linked system bcc into .venv")
fi

# --- 4. verify --------------------------------------------------------------------------
"$VENV/bin/python" -c 'import bcc' >"$LOG" 2>&1 ||
  fail_with_log ".venv/bin/python -c 'import bcc'"

if ((${#did[@]})); then
  summary="$(printf '%s; ' "${did[@]}")"
  echo "setup: ${summary%; }; bcc imports in .venv."
else
  echo "setup: nothing to do; system packages and .venv are up to date, bcc imports."
fi
