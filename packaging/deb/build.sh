#!/bin/bash
# Build the mcp-privsep Debian package with dpkg-deb: 'make deb' runs this.
#
#   packaging/deb/build.sh [OUTDIR]        (default OUTDIR: ./dist)
#
# The package ships wheels, not an installed tree: the project's wheel and
# the wheels of its dependencies at the versions pinned in constraints.txt
# (built or fetched here, for this machine's python3 and architecture),
# under /usr/share/mcp-privsep/wheels. Its postinst builds
# /opt/mcp-privsep/venv from them with 'pip install --no-index', so the
# package installs offline. Environment:
#   PYTHON_SYS  the python3 the package targets (default /usr/bin/python3)
#   DEB_MAINTAINER  the Maintainer field (default: mcp-privsep maintainers <mcp-privsep@example.org>)
#   PIP         a pip command to fetch/build wheels with (default: a
#               throw-away virtualenv of PYTHON_SYS)
set -euo pipefail

SRC="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:-$SRC/dist}"
PY="${PYTHON_SYS:-/usr/bin/python3}"
MAINTAINER="${DEB_MAINTAINER:-mcp-privsep maintainers <mcp-privsep@example.org>}"

VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$SRC/broker/__init__.py")"
[ -n "$VERSION" ] || { echo "build.sh: no __version__ in broker/__init__.py" >&2; exit 1; }
DEBVERSION="$VERSION-1"
ARCH="$(dpkg --print-architecture)"
PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
PYNEXT="$("$PY" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')"

WORK="$(mktemp -d /tmp/mcp-privsep-deb.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PKG="$WORK/mcp-privsep_${DEBVERSION}_${ARCH}"
umask 022
install -d "$PKG/DEBIAN" "$PKG/usr/share/mcp-privsep/wheels" "$PKG/usr/share/doc/mcp-privsep/examples" \
    "$PKG/usr/share/bash-completion/completions" "$PKG/lib/systemd/system"

if [ -z "${PIP:-}" ]; then
    "$PY" -m venv "$WORK/buildenv"
    PIP="$WORK/buildenv/bin/python -m pip"
fi
# the project (a clean copy: no build/ or egg-info leftovers) and its pinned runtime dependencies
mkdir "$WORK/src"
tar -C "$SRC" --exclude=./.git --exclude=./dist --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude='./.*_cache' --exclude=./.hypothesis -cf - . | tar -C "$WORK/src" -xf -
$PIP wheel --quiet --disable-pip-version-check -c "$SRC/constraints.txt" \
    --wheel-dir "$PKG/usr/share/mcp-privsep/wheels" "$WORK/src"
install -m 0644 "$SRC/constraints.txt" "$PKG/usr/share/mcp-privsep/constraints.txt"

install -m 0644 "$SRC/packaging/mcp-brokerctl.bash-completion" "$PKG/usr/share/bash-completion/completions/mcp-brokerctl"
install -m 0644 "$SRC/packaging/mcp-brokerd.service" "$PKG/lib/systemd/system/mcp-brokerd.service"
install -m 0644 "$SRC/packaging/deb/copyright" "$PKG/usr/share/doc/mcp-privsep/copyright"
install -m 0644 "$SRC/README.md" "$PKG/usr/share/doc/mcp-privsep/README.md"
for f in "$SRC"/docs/*.md; do
    [ -e "$f" ] && install -m 0644 "$f" "$PKG/usr/share/doc/mcp-privsep/"
done
install -m 0644 "$SRC/etc/broker.toml" "$SRC/etc/allowed-actions.txt" "$SRC/packaging/sudoers.in" \
    "$SRC/packaging/mcp-brokerd.openrc" "$PKG/usr/share/doc/mcp-privsep/examples/"
printf 'mcp-privsep (%s) unstable; urgency=medium\n\n  * Package built by packaging/deb/build.sh.\n\n -- %s  %s\n' \
    "$DEBVERSION" "$MAINTAINER" "$(date -R)" | gzip -9n > "$PKG/usr/share/doc/mcp-privsep/changelog.Debian.gz"

for s in postinst prerm postrm; do
    install -m 0755 "$SRC/packaging/deb/$s" "$PKG/DEBIAN/$s"
done
SIZE="$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)"
sed -e "s/@VERSION@/$DEBVERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@PYVER@/$PYVER/" -e "s/@PYNEXT@/$PYNEXT/" \
    -e "s/@SIZE@/$SIZE/" -e "s|@MAINTAINER@|$MAINTAINER|" "$SRC/packaging/deb/control.in" > "$PKG/DEBIAN/control"
(cd "$PKG" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) > "$PKG/DEBIAN/md5sums"
chmod 0644 "$PKG/DEBIAN/control" "$PKG/DEBIAN/md5sums"

mkdir -p "$OUT"
dpkg-deb --root-owner-group -Zgzip --build "$PKG" "$OUT/" >/dev/null
echo "$OUT/mcp-privsep_${DEBVERSION}_${ARCH}.deb"
