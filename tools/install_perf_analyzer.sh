#!/usr/bin/env bash
# Install a working perf_analyzer into .venv/perf_analyzer/ (idempotent; ~0 s when already there).
# Why this way (docs/triton-2.51.md): PyPI perf-analyzer 2.58+ and tritonclient >= 2.52 binaries need glibc 2.38;
# the binary inside the tritonclient 2.51.0 wheel (the server's own release) runs here once libb64 and libcudart
# are found, and nvidia-pytriton (in the venv already) ships both in nvidia_pytriton.libs.
# Layout: bin/perf_analyzer (the real binary), lib/ (symlinks), perf_analyzer (the wrapper to call).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=2.51.0
VENV=${VENV:-.venv}
DEST=$VENV/perf_analyzer
STAMP=$DEST/.installed-$VERSION
WHEEL_PATH=tritonclient-$VERSION.data/data/bin/perf_analyzer

if [[ -f $STAMP && -x $DEST/bin/perf_analyzer && -e $DEST/lib/libb64.so.0d && -e $DEST/lib/libcudart.so.12 ]]; then
  echo "[perf_analyzer] up to date ($DEST/perf_analyzer)"
  exit 0
fi

site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
libs=$site/nvidia_pytriton.libs
[[ -d $libs ]] || { echo "[perf_analyzer] $libs missing: install the venv first (bin/setup)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# --platform pins the x86_64 manylinux wheel (the one that carries the binary), whatever pip would pick.
"$VENV/bin/pip" download --disable-pip-version-check -q --no-deps --only-binary=:all: \
  --platform manylinux1_x86_64 "tritonclient==$VERSION" -d "$tmp" 2>&1 | { grep -v "^WARNING: Location" || true; }
wheel=$(ls "$tmp"/tritonclient-"$VERSION"-*manylinux*x86_64.whl)

rm -rf "$DEST"
mkdir -p "$DEST/bin" "$DEST/lib"
unzip -q -j -o "$wheel" "$WHEEL_PATH" -d "$DEST/bin"
chmod +x "$DEST/bin/perf_analyzer"
# The auditwheel-renamed libraries under the sonames the binary asks for.
for soname in libb64.so.0d libcudart.so.12; do
  stem=${soname%%.so*}
  target=$(ls "$libs"/"$stem"-*.so* | head -1)
  ln -sf "$(realpath "$target")" "$DEST/lib/$soname"
done
cat > "$DEST/perf_analyzer" <<'SH'
#!/usr/bin/env bash
# perf_analyzer 2.51 (from the tritonclient wheel) with its libraries on LD_LIBRARY_PATH: tools/install_perf_analyzer.sh
here=$(dirname "$(realpath "$0")")
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$here/bin/perf_analyzer" "$@"
SH
chmod +x "$DEST/perf_analyzer"
ln -sf "../perf_analyzer/perf_analyzer" "$VENV/bin/perf_analyzer"

# Fail here, not at the first benchmark, if the binary does not load (2.51 has no --help: it exits 99 on it).
"$DEST/perf_analyzer" --version > /dev/null 2>&1 || {
  echo "[perf_analyzer] installed binary does not run:" >&2; "$DEST/perf_analyzer" --version 2>&1 | head -5 >&2; exit 1; }
touch "$STAMP"
echo "[perf_analyzer] installed $DEST/perf_analyzer (tritonclient $VERSION)"
