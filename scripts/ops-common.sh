# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables are for the scripts that source this file
# Shared by scripts/install, scripts/update and scripts/uninstall (sourced, not run).
# Every path lives under $ROOT (--root DIR or VMC_ROOT; empty = the real /), and every command
# that changes the system can be replaced through the environment, so that a test can run the
# whole install, update and rollback in a temporary folder (tests/test_install.py):
#   VMC_SYSTEMCTL  (default: systemctl)      VMC_USERADD (useradd)   VMC_USERMOD (usermod)
#   VMC_USERDEL    (userdel)                 VMC_CHOWN   (chown)     VMC_PYTHON  (python3)
# VMC_NO_COMPILE=1 skips byte-compiling the release (tests; a board wants it, as the service
# cannot write __pycache__ under ProtectSystem=strict).
# Releases are installed with uv (pinned with its hashes in requirements-tools.lock, put into
# /opt/vmc/tools by pip once): it installs a release from a warm cache in about a second
# where pip takes 10-20 s on a 2-core board, so an update's downtime-free preparation is short.
# A replacement may carry arguments ("python3 -m hil.systemctl --root /tmp/x").

set -euo pipefail

SERVICE_USER=vmc
UNIT=vmc.service
#: Oldest Python vmc runs on (pyproject.toml requires-python).
MIN_PYTHON=3.11

ROOT="${VMC_ROOT:-}"
read -r -a SYSTEMCTL <<<"${VMC_SYSTEMCTL:-systemctl}"
read -r -a USERADD <<<"${VMC_USERADD:-useradd}"
read -r -a USERMOD <<<"${VMC_USERMOD:-usermod}"
read -r -a USERDEL <<<"${VMC_USERDEL:-userdel}"
read -r -a CHOWN <<<"${VMC_CHOWN:-chown}"
PYTHON="${VMC_PYTHON:-python3}"
# uv hard-links the files out of its cache where it can (same file system): nothing in a
# release is ever written to afterwards, and cleaning the cache only drops its own links.
UV_INSTALL=(pip install --quiet --no-deps)
if [[ "${VMC_NO_COMPILE:-0}" != 1 ]]; then
    UV_INSTALL+=(--compile-bytecode)
fi
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '%s: %s\n' "$(basename "$0")" "$*"; }
die() {
    printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
    exit 1
}

set_paths() {
    ROOT="${ROOT%/}"
    OPT="$ROOT/opt/vmc"
    TOOLS="$OPT/tools"
    RELEASES="$OPT/releases"
    CURRENT="$OPT/current"
    ETC="$ROOT/etc/vmc"
    CONFIG="$ETC/vmc.toml"
    STATE="$ROOT/var/lib/vmc"
    UNIT_DIR="$ROOT/etc/systemd/system"
}

need_root() {
    if [[ -z "$ROOT" && "$(id -u)" != 0 ]]; then
        die "run as root (or give --root DIR to install into a folder)"
    fi
}

# The release's name: the version in pyproject.toml and the source's git commit when known.
default_release_name() {
    local version commit
    version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$SOURCE/pyproject.toml" | head -n 1)"
    commit="$(git -C "$SOURCE" rev-parse --short=12 HEAD 2>/dev/null || true)"
    if [[ -n "$commit" ]] && ! git -C "$SOURCE" diff --quiet HEAD 2>/dev/null; then
        commit="$commit-dirty-$(date -u +%Y%m%dT%H%M%SZ)"
    fi
    printf '%s\n' "${version:-0}-${commit:-$(date -u +%Y%m%dT%H%M%SZ)}"
}

check_python() {
    "$PYTHON" - "$MIN_PYTHON" <<'EOF' || die "$PYTHON is older than Python $MIN_PYTHON"
import sys
wanted = tuple(int(part) for part in sys.argv[1].split("."))
sys.exit(0 if sys.version_info[:2] >= wanted else 1)
EOF
    "$PYTHON" -m pip --version >/dev/null 2>&1 ||
        die "$PYTHON has no pip (Debian: apt-get install python3-pip python3-venv)"
}

# ensure_uv: uv in $TOOLS, exactly as requirements-tools.lock pins it (set up again when the
# lock changed); sets UV.
ensure_uv() {
    local lock="$SOURCE/requirements-tools.lock"
    UV="$TOOLS/venv/bin/uv"
    if [[ -x "$UV" ]] && cmp -s "$lock" "$TOOLS/requirements-tools.lock"; then
        return
    fi
    rm -rf "$TOOLS"
    "$PYTHON" -m venv --without-pip "$TOOLS/venv"
    "$PYTHON" -m pip --python "$TOOLS/venv/bin/python" install --quiet \
        --disable-pip-version-check --require-hashes --no-deps -r "$lock"
    cp "$lock" "$TOOLS/requirements-tools.lock"
}

# install_release NAME: the code from $SOURCE into $RELEASES/NAME with a venv of its own, the
# dependencies exactly as requirements.lock pins them (versions and hashes). A release left
# half-made by an earlier failure (no .complete marker) is made again.
install_release() {
    local name="$1" dir="$RELEASES/$1"
    if [[ -f "$dir/.complete" ]]; then
        die "release $name is already installed in $dir (give another --release NAME)"
    fi
    rm -rf "$dir"
    mkdir -p "$dir/src"
    local item
    for item in pyproject.toml README.md requirements.lock requirements-tools.lock vmc drivers hil \
        config systemd docs; do
        cp -a "$SOURCE/$item" "$dir/src/"
    done
    find "$dir/src" -name __pycache__ -prune -exec rm -rf {} +
    rm -rf "$dir/src/"*.egg-info
    say "installing release $name into $dir"
    ensure_uv
    "$UV" venv --quiet --python "$(command -v "$PYTHON")" "$dir/venv"
    "$UV" "${UV_INSTALL[@]}" --python "$dir/venv/bin/python" --require-hashes \
        -r "$dir/src/requirements.lock"
    # vmc itself, built with the setuptools the lock pinned, nothing fetched.
    (cd "$dir/src" && "$UV" "${UV_INSTALL[@]}" --python "$dir/venv/bin/python" \
        --no-build-isolation --offline .)
    rm -rf "$dir/src/build" "$dir/src/"*.egg-info
    local version
    version="$("$dir/venv/bin/vmc" --version)" || die "release $name: vmc --version failed"
    {
        printf 'release=%s\n' "$name"
        printf 'version=%s\n' "$version"
        printf 'commit=%s\n' "$(git -C "$SOURCE" rev-parse HEAD 2>/dev/null || echo unknown)"
        printf 'installed=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        printf 'lock_sha256=%s\n' "$(sha256sum "$dir/src/requirements.lock" | cut -d' ' -f1)"
    } >"$dir/release.txt"
    touch "$dir/.complete"
}

# point_current NAME: switch the "current" symlink in one rename (never a moment without it).
point_current() {
    ln -sfn "releases/$1" "$OPT/.current.new"
    mv -T "$OPT/.current.new" "$CURRENT"
}

current_release() {
    local target
    target="$(readlink "$CURRENT" 2>/dev/null || true)"
    printf '%s\n' "${target#releases/}"
}

# install_unit NAME: the unit file of that release, then daemon-reload.
install_unit() {
    mkdir -p "$UNIT_DIR"
    install -m 0644 "$RELEASES/$1/src/systemd/$UNIT" "$UNIT_DIR/$UNIT"
    "${SYSTEMCTL[@]}" daemon-reload
}
