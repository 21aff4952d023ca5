#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` as a *reference* for speed comparisons.
#
# llama.cpp is never a dependency of attn: this builds one benchmark binary outside the repo
# (default ~/.cache/attn-bench) from the llama.cpp that the `llama-cpp-python` source
# distribution on PyPI vendors (model hubs and GitHub are not reachable here; PyPI is).
#
#   scripts/bench/build_llamacpp.sh            # prints the path of llama-bench on stdout
#   LLAMA_BENCH=$(scripts/bench/build_llamacpp.sh)
#
# Idempotent: a finished build with the same pin and flags is reused (stamp file); a partial
# build is resumed. Progress goes to stderr, only the binary path to stdout.
#
# Only the llama-bench target is built (static, GGML_NATIVE=ON, Release): about 10-15 min on
# 2 cores, against 30+ min for `pip install llama-cpp-python`, which builds everything.
#
# Environment:
#   ATTN_BENCH_HOME   work directory (default ~/.cache/attn-bench)
#   LLAMA_CPP_SDIST   an already downloaded sdist to use (its sha256 is checked)
#   BUILD_VENV        virtualenv for cmake/ninja/scikit-build-core (default ~/.venvs/cmake)
#   JOBS              parallel compile jobs (default: nproc)
#   LLAMA_NO_AMX=1    compile without AMX (-mno-amx-*): this llama.cpp's AMX matmul dies with
#                     SIGILL on a 2-core Xeon with AMX (`tilezero` in an OpenMP worker that
#                     never loaded a tile configuration), so there it is built without
set -euo pipefail

# ---- the pin -------------------------------------------------------------------------------
PKG=llama-cpp-python
VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# ---------------------------------------------------------------------------------------------

ROOT=${ATTN_BENCH_HOME:-$HOME/.cache/attn-bench}
BUILD_VENV=${BUILD_VENV:-$HOME/.venvs/cmake}
JOBS=${JOBS:-$(nproc)}
SDIST_NAME=llama_cpp_python-$VERSION.tar.gz
SRC=$ROOT/src/llama_cpp_python-$VERSION
BUILD=$ROOT/build-llama-cpp-python-$VERSION
BIN=$BUILD/bin/llama-bench

log() { echo "[build_llamacpp] $*" >&2; }
die() { echo "[build_llamacpp] error: $*" >&2; exit 1; }

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SDIST_SHA256" ]; }

# The upstream llama.cpp commit of the vendored copy: the sdist has no .git, but its
# CHANGELOG names it ("update llama.cpp to ggml-org/llama.cpp@<sha>") under the version.
upstream_commit() {
    awk -v v="## [$VERSION]" '
        index($0, v) == 1 { on = 1; next }
        on && /^## \[/ { exit }
        on && match($0, /ggml-org\/llama\.cpp@[0-9a-f]+/) {
            print substr($0, RSTART + 19, RLENGTH - 19); exit
        }' "$SRC/CHANGELOG.md" 2>/dev/null || true
}

CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=ON            # compile for this CPU, as `pip install llama-cpp-python` does
    -DBUILD_SHARED_LIBS=OFF     # one self-contained binary
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_MTMD=OFF
)
if [ "${LLAMA_NO_AMX:-0}" = 1 ]; then
    CMAKE_FLAGS+=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                  "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
fi
stamp_text() { echo "$PKG $VERSION $SDIST_SHA256 commit=$(upstream_commit) ${CMAKE_FLAGS[*]}"; }
STAMP=$BUILD/.attn-bench-stamp

# 1. Reuse a finished build.
if [ -x "$BIN" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_text)" ]; then
    log "reusing $BIN"
    echo "$BIN"
    exit 0
fi

mkdir -p "$ROOT/src"

# 2. Build tools: cmake (>= 3.14) and ninja from PyPI into a virtualenv outside the repo,
#    unless suitable ones are on PATH. scikit-build-core lets `pip download` read the sdist's
#    metadata without building cmake from source in an isolated environment.
ensure_venv() {
    if [ ! -x "$BUILD_VENV/bin/pip" ]; then
        log "creating $BUILD_VENV"
        python3 -m venv "$BUILD_VENV"
    fi
    local missing=()
    [ -x "$BUILD_VENV/bin/cmake" ] || missing+=(cmake)
    [ -x "$BUILD_VENV/bin/ninja" ] || missing+=(ninja)
    "$BUILD_VENV/bin/python" -c 'import scikit_build_core' 2>/dev/null || missing+=(scikit-build-core)
    if [ ${#missing[@]} -gt 0 ]; then
        log "pip install ${missing[*]} into $BUILD_VENV"
        "$BUILD_VENV/bin/pip" install -q "${missing[@]}" >&2
    fi
}
ensure_venv
CMAKE=$BUILD_VENV/bin/cmake
GENERATOR=(-G Ninja -DCMAKE_MAKE_PROGRAM="$BUILD_VENV/bin/ninja")

# 3. The sdist, sha256-checked whatever its source.
SDIST=$ROOT/src/$SDIST_NAME
if ! sha_ok "$SDIST"; then
    rm -f "$SDIST"
    if [ -n "${LLAMA_CPP_SDIST:-}" ]; then
        sha_ok "$LLAMA_CPP_SDIST" || die "$LLAMA_CPP_SDIST: missing or sha256 differs from the pin"
        cp "$LLAMA_CPP_SDIST" "$SDIST"
    else
        log "pip download $PKG==$VERSION (sdist, hash-pinned)"
        req=$(mktemp)
        echo "$PKG==$VERSION --hash=sha256:$SDIST_SHA256" >"$req"
        "$BUILD_VENV/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation \
            --require-hashes -r "$req" -d "$ROOT/src" >&2
        rm -f "$req"
    fi
    sha_ok "$SDIST" || die "sha256 of $SDIST differs from the pin $SDIST_SHA256"
fi
log "sdist $SDIST (sha256 ok)"

# 4. Unpack (fresh if a previous unpack was cut short).
if [ ! -f "$SRC/.attn-bench-unpacked" ]; then
    rm -rf "$SRC"
    log "unpacking"
    tar -xzf "$SDIST" -C "$ROOT/src"
    [ -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ] || die "no vendor/llama.cpp in the sdist"
    touch "$SRC/.attn-bench-unpacked"
fi

# 5. Configure and build only llama-bench. The build number is unknown without git (0); the
#    upstream commit comes from the CHANGELOG. GIT_CEILING_DIRECTORIES keeps llama.cpp's
#    build-info from picking up an enclosing git repository's commit.
COMMIT=$(upstream_commit)
export GIT_CEILING_DIRECTORIES=$ROOT
log "configuring (llama.cpp ${COMMIT:-unknown}) in $BUILD"
rm -f "$STAMP"
"$CMAKE" -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${GENERATOR[@]}" "${CMAKE_FLAGS[@]}" \
    -DLLAMA_BUILD_COMMIT="${COMMIT:-unknown}" -DLLAMA_BUILD_NUMBER=0 >"$ROOT/cmake-configure.log" 2>&1 \
    || die "cmake configure failed, see $ROOT/cmake-configure.log"
log "building llama-bench with $JOBS jobs (log: $ROOT/cmake-build.log)"
start=$(date +%s)
"$CMAKE" --build "$BUILD" --target llama-bench -j "$JOBS" >"$ROOT/cmake-build.log" 2>&1 \
    || { tail -30 "$ROOT/cmake-build.log" >&2; die "build failed, see $ROOT/cmake-build.log"; }
log "built in $(( $(date +%s) - start )) s"
[ -x "$BIN" ] || die "build finished but $BIN is missing"
stamp_text >"$STAMP"
echo "$BIN"
