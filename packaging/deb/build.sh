#!/bin/bash
# Build the mcp-privsep Debian package with dpkg-deb: 'make deb' runs this.
#
#   packaging/deb/build.sh [OUTDIR]        (default OUTDIR: ./dist)
#
# The package ships the code installed, in a dpkg-owned place, so that
# 'dpkg -S' names the package of every file and 'dpkg --verify' sees an
# edited one:
#
#   /usr/lib/mcp-privsep/venv/           a virtualenv of the project and its dependencies at the versions
#                                        pinned in constraints.txt (built here, for this machine's python3
#                                        and architecture; no bytecode: postinst compiles it with py3compile)
#   /usr/sbin/mcp-gate                   the gate sudo runs (packaged_gate_script)
#   /usr/bin/mcp                         the agent's command; it runs /etc/mcp-privsep/mcp.sh, the agents'
#                                        table 'mcp-brokerctl install' writes (packaged_mcp_command)
#   /usr/sbin/mcp-brokerd, mcp-brokerctl links into the virtualenv
#   /etc/init.d/mcp-brokerd              the sysvinit script (a conffile), /lib/systemd/system/mcp-brokerd.service
#
# The unit, the init scripts and the examples are the files in packaging/
# with the source install's /usr/local/sbin paths turned into /usr/sbin.
# Nothing is shipped in /usr/local or /opt. Environment:
#   PYTHON_SYS      the python3 the package targets (default /usr/bin/python3)
#   DEB_MAINTAINER  the Maintainer field (default: mcp-privsep maintainers <mcp-privsep@example.org>)
#   DEB_REVISION    the Debian revision (default 2: 0.1.0-1 built the venv in /opt in its postinst);
#                   bump it for a packaging-only change, reset it to 1 with a new upstream version
#   PIP             a pip command to fetch/build wheels with (default: a
#                   throw-away virtualenv of PYTHON_SYS)
set -euo pipefail

SRC="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:-$SRC/dist}"
PY="${PYTHON_SYS:-/usr/bin/python3}"
MAINTAINER="${DEB_MAINTAINER:-mcp-privsep maintainers <mcp-privsep@example.org>}"
LIB=/usr/lib/mcp-privsep
VENV="$LIB/venv"

VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$SRC/broker/__init__.py")"
[ -n "$VERSION" ] || { echo "build.sh: no __version__ in broker/__init__.py" >&2; exit 1; }
DEBVERSION="$VERSION-${DEB_REVISION:-2}"
ARCH="$(dpkg --print-architecture)"
PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
PYNEXT="$("$PY" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')"
for tool in dpkg-deb dpkg-shlibdeps strip; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (apt-get install -y dpkg-dev)" >&2; exit 1; }
done

WORK="$(mktemp -d /tmp/mcp-privsep-deb.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PKG="$WORK/mcp-privsep_${DEBVERSION}_${ARCH}"
STAGE="$PKG$VENV"
DOC="$PKG/usr/share/doc/mcp-privsep"
umask 022
install -d "$PKG/DEBIAN" "$PKG$LIB" "$PKG/usr/bin" "$PKG/usr/sbin" "$DOC/examples" "$PKG/etc/init.d" \
    "$PKG/usr/share/bash-completion/completions" "$PKG/lib/systemd/system"

if [ -z "${PIP:-}" ]; then
    "$PY" -m venv "$WORK/buildenv"
    PIP="$WORK/buildenv/bin/python -m pip"
fi
# the project (a clean copy: no build/ or egg-info leftovers) and its pinned runtime dependencies, as wheels
mkdir "$WORK/src"
tar -C "$SRC" --exclude=./.git --exclude=./dist --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude='./.*_cache' --exclude=./.hypothesis -cf - . | tar -C "$WORK/src" -xf -
$PIP wheel --quiet --disable-pip-version-check -c "$SRC/constraints.txt" --wheel-dir "$WORK/wheels" "$WORK/src"

# --- the virtualenv, made here and run from $VENV ------------------------------------------------------
# pip stays in it (the admin side asks it about packages); setuptools is not needed
"$PY" -m venv "$STAGE"
PIP_CONFIG_FILE=/dev/null "$STAGE/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
    --no-cache-dir --no-compile --find-links "$WORK/wheels" -c "$SRC/constraints.txt" mcp-privsep
PIP_CONFIG_FILE=/dev/null "$STAGE/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y setuptools
# no activate scripts and no pip command in it (python -m pip still works): nothing invites installing into it
rm -f "$STAGE"/bin/activate* "$STAGE"/bin/Activate.ps1 "$STAGE"/bin/pip "$STAGE"/bin/pip3 "$STAGE"/bin/pip3.*
# the shared libraries stripped of their debugging symbols, as dh_strip does
find "$STAGE" -type f \( -name '*.so' -o -name '*.so.*' \) -exec strip --strip-unneeded --remove-section=.comment \
    --remove-section=.note {} +
# its scripts' #! lines and pyvenv.cfg name the staging directory: name the installed one
grep -rlIZF "$STAGE" "$STAGE" | xargs -0 -r sed -i "s|$STAGE|$VENV|g"
SITE="$("$STAGE/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
SITE="${SITE#"$PKG"}"

# --- the commands ----------------------------------------------------------------------------------------
render() { # FUNCTION ARG: the text broker.admin.install makes, so the package and install agree
    "$STAGE/bin/python" -B -c 'import sys
from broker.admin import install
from broker.core.paths import Paths
arg = Paths("/", layout="deb") if sys.argv[1] == "packaged_mcp_command" else sys.argv[2]
sys.stdout.write(getattr(install, sys.argv[1])(arg))' "$@"
}
render packaged_gate_script "$VENV" > "$PKG/usr/sbin/mcp-gate"
render packaged_mcp_command - > "$PKG/usr/bin/mcp"
grep -qF "sys.path.append('$SITE')" "$PKG/usr/sbin/mcp-gate" || { echo "build.sh: the gate misses $SITE" >&2; exit 1; }
chmod 0755 "$PKG/usr/sbin/mcp-gate" "$PKG/usr/bin/mcp"
ln -s "../lib/mcp-privsep/venv/bin/mcp-brokerd" "$PKG/usr/sbin/mcp-brokerd"
ln -s "../lib/mcp-privsep/venv/bin/mcp-brokerctl" "$PKG/usr/sbin/mcp-brokerctl"
# the interpreter link relative, as Debian Policy 10.5 wants within /usr (the venv runs no more here)
PYREAL="$(readlink "$STAGE/bin/python3" || true)"
case "$PYREAL" in /usr/bin/*) ln -sfn "../../../..${PYREAL#/usr}" "$STAGE/bin/python3" ;; esac
find "$PKG" -name __pycache__ -prune -exec rm -rf {} +
if grep -rqF "$WORK" "$PKG"; then
    echo "build.sh: the package names the build directory:" >&2
    grep -rlF "$WORK" "$PKG" >&2
    exit 1
fi

# --- units, init scripts, docs ------------------------------------------------------------------------
packaged() { sed -e 's|/usr/local/sbin/|/usr/sbin/|g' -e 's|/usr/local/bin/|/usr/bin/|g' "$1"; }
packaged "$SRC/packaging/mcp-brokerd.service" > "$PKG/lib/systemd/system/mcp-brokerd.service"
packaged "$SRC/packaging/mcp-brokerd.init" > "$PKG/etc/init.d/mcp-brokerd"
chmod 0755 "$PKG/etc/init.d/mcp-brokerd"
packaged "$SRC/packaging/mcp-brokerd.openrc" > "$DOC/examples/mcp-brokerd.openrc"
packaged "$SRC/packaging/sudoers.in" > "$DOC/examples/sudoers.in"
sed -e "s|/opt/mcp-privsep/venv/|$VENV/|g" "$SRC/etc/broker.toml" > "$DOC/examples/broker.toml"
install -m 0644 "$SRC/etc/allowed-actions.txt" "$DOC/examples/"
install -m 0644 "$SRC/packaging/mcp-brokerctl.bash-completion" "$PKG/usr/share/bash-completion/completions/mcp-brokerctl"
install -m 0644 "$SRC/packaging/deb/copyright" "$DOC/copyright"
install -m 0644 "$SRC/README.md" "$DOC/README.md"
for f in "$SRC"/docs/*.md; do
    [ -e "$f" ] && install -m 0644 "$f" "$DOC/"
done
printf 'mcp-privsep (%s) unstable; urgency=medium\n\n  * Package built by packaging/deb/build.sh.\n\n -- %s  %s\n' \
    "$DEBVERSION" "$MAINTAINER" "$(date -R)" | gzip -9n > "$DOC/changelog.Debian.gz"

# --- control ---------------------------------------------------------------------------------------------
for s in postinst prerm postrm; do
    install -m 0755 "$SRC/packaging/deb/$s" "$PKG/DEBIAN/$s"
done
echo /etc/init.d/mcp-brokerd > "$PKG/DEBIAN/conffiles"
# the shared libraries of the dependencies' wheels (pydantic-core, rpds-py, ...): what they link against
mkdir -p "$WORK/shlibs/debian"
printf 'Source: mcp-privsep\n\nPackage: mcp-privsep\nArchitecture: any\n' > "$WORK/shlibs/debian/control"
mapfile -d '' ELF < <(find "$PKG" -type f \( -name '*.so' -o -name '*.so.*' \) -print0)
SHLIBS=""
if [ "${#ELF[@]}" -gt 0 ]; then
    SHLIBS="$(cd "$WORK/shlibs" && dpkg-shlibdeps -O --ignore-missing-info -l"$STAGE/lib" "${ELF[@]/#/-e}" 2>/dev/null \
        | sed -n 's/^shlibs:Depends=//p')"
fi
SIZE="$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)"
sed -e "s/@VERSION@/$DEBVERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@PYVER@/$PYVER/" -e "s/@PYNEXT@/$PYNEXT/" \
    -e "s/@SIZE@/$SIZE/" -e "s|@MAINTAINER@|$MAINTAINER|" -e "s|@SHLIBS@|${SHLIBS:+, $SHLIBS}|" \
    "$SRC/packaging/deb/control.in" > "$PKG/DEBIAN/control"
(cd "$PKG" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) > "$PKG/DEBIAN/md5sums"
chmod 0644 "$PKG/DEBIAN/control" "$PKG/DEBIAN/md5sums" "$PKG/DEBIAN/conffiles"

mkdir -p "$OUT"
dpkg-deb --root-owner-group -Zgzip --build "$PKG" "$OUT/" >/dev/null
echo "$OUT/mcp-privsep_${DEBVERSION}_${ARCH}.deb"
