#!/usr/bin/env bash
# Builds nginx + Kong's ngx_wasm_module + the wasmtime C API, once per machine, and leaves the
# binary at .nginx-wasm/sbin/nginx (a symlink into the cache).
#
#   scripts/setup-nginx.sh            build (first run, ~10 min on 2 cores) or reuse the cache
#   scripts/setup-nginx.sh --check    exit 0 if the cached build exists, 1 otherwise (no build)
#
# Sources: the release tarballs of nginx and ngx_wasm_module, verified against SHA256SUMS, from
#   $EXO_LB_NGINX_SOURCES (default: <repo>/../shared/vendor). wasmtime's C API comes from
#   crates.io (crate wasmtime-c-api-impl, built through nginx/wasmtime-capi/).
# Cache: $EXO_LB_CACHE_DIR (default ~/.cache/exo-lb)/nginx-wasm-<nginx>-<module>-wasmtime<ver>-r<n>
# Build dependencies (Debian): build-essential libpcre2-dev libssl-dev zlib1g-dev cmake, installed
#   with apt-get when missing (needs root or sudo); a Rust toolchain >= 1.78 (rustup's).
#
# No-build alternative: Kong publishes prebuilt nginx binaries with this module (the `wasmx-*`
# archives attached to the ngx_wasm_module releases, e.g. prerelease-0.6.0, with wasmtime); unpack
# one and run its nginx binary, or put it at .nginx-wasm/sbin/nginx (a directory of yours there is
# left alone by this script). See docs/nginx.md.
set -euo pipefail

NGINX_VERSION=1.27.4
MODULE_VERSION=prerelease-0.6.0
WASMTIME_VERSION=26.0.0
# Bump when the recipe below changes in a way that needs a rebuild.
RECIPE=1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SOURCES=${EXO_LB_NGINX_SOURCES:-$(dirname "$REPO")/shared/vendor}
CACHE_ROOT=${EXO_LB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/exo-lb}
KEY=nginx-wasm-$NGINX_VERSION-$MODULE_VERSION-wasmtime$WASMTIME_VERSION-r$RECIPE
PREFIX=$CACHE_ROOT/$KEY
LINK=$REPO/.nginx-wasm
JOBS=${CARGO_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
NGINX_TARBALL=nginx-$NGINX_VERSION.tar.gz
MODULE_TARBALL=ngx_wasm_module-$MODULE_VERSION.tar.gz

log() { echo "setup-nginx: $*" >&2; }
fail() {
    log "cannot build nginx-wasm: $*"
    exit 1
}

link_result() {
    if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
        log "$LINK is a directory of yours (a prebuilt nginx?), not this script's link: left as it is; the build is in $PREFIX"
        return
    fi
    ln -sfn "$PREFIX" "$LINK"
    log "nginx-wasm ready: $LINK/sbin/nginx -> $PREFIX/sbin/nginx"
}

cached() { [ -f "$PREFIX/.complete" ] && "$PREFIX/sbin/nginx" -V >/dev/null 2>&1; }

if [ "${1:-}" = "--check" ]; then
    cached
    exit
fi

START=$(date +%s)
if cached; then
    link_result
    log "reused the cache ($(($(date +%s) - START)) s)"
    exit 0
fi

# --- preconditions: say why the build cannot happen ------------------------------------------
[ "$(uname -s)" = Linux ] || fail "only Linux is supported (this is $(uname -s)); use Kong's prebuilt wasmx release instead"
command -v sha256sum >/dev/null || fail "sha256sum (coreutils) is missing"
[ -d "$SOURCES" ] || fail "no sources directory $SOURCES (set EXO_LB_NGINX_SOURCES to a directory with $NGINX_TARBALL, $MODULE_TARBALL and SHA256SUMS)"
for f in "$NGINX_TARBALL" "$MODULE_TARBALL" SHA256SUMS; do
    [ -f "$SOURCES/$f" ] || fail "$SOURCES/$f is missing"
done
for f in "$NGINX_TARBALL" "$MODULE_TARBALL"; do
    want=$(awk -v f="$f" '$2 == f || $2 == "*" f { print $1 }' "$SOURCES/SHA256SUMS")
    [ -n "$want" ] || fail "$SOURCES/SHA256SUMS has no line for $f"
    have=$(sha256sum "$SOURCES/$f" | cut -d' ' -f1)
    [ "$want" = "$have" ] || fail "checksum mismatch for $SOURCES/$f (expected $want, got $have)"
done
log "checksums of $NGINX_TARBALL and $MODULE_TARBALL match"

DEB_PACKAGES=(build-essential libpcre2-dev libssl-dev zlib1g-dev cmake)
missing=()
if command -v dpkg-query >/dev/null; then
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ]; then
            SUDO=()
        elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            SUDO=(sudo -n)
        else
            fail "missing Debian packages ${missing[*]} and no root or password-less sudo to install them"
        fi
        log "installing ${missing[*]}"
        "${SUDO[@]}" apt-get update -qq || fail "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
            fail "apt-get install ${missing[*]} failed"
    fi
else
    for t in cc make cmake; do
        command -v $t >/dev/null || fail "$t is missing and this is not a Debian system (install a C toolchain, make, cmake, PCRE2, OpenSSL and zlib headers)"
    done
fi

command -v cargo >/dev/null || fail "cargo is missing (install Rust with rustup; wasmtime $WASMTIME_VERSION needs rustc 1.78+)"
rustc_minor=$(rustc --version | sed -nE 's/^rustc 1\.([0-9]+).*/\1/p')
[ -n "$rustc_minor" ] && [ "$rustc_minor" -ge 78 ] ||
    fail "rustc 1.78+ is needed for wasmtime $WASMTIME_VERSION (have: $(rustc --version)); Debian's rustc is too old, use rustup's"

mkdir -p "$CACHE_ROOT"
# One build at a time per cache (parallel test runs wait for the first).
exec 9>"$CACHE_ROOT/.$KEY.lock"
if ! flock -n 9; then
    log "another build of $KEY is running; waiting for it"
    flock 9
    if cached; then
        link_result
        exit 0
    fi
fi

# --- wasmtime C API (libwasmtime.a and headers) ----------------------------------------------
WASMTIME_TARGET=$CACHE_ROOT/wasmtime-capi-$WASMTIME_VERSION-target
log "building the wasmtime $WASMTIME_VERSION C API (crates.io; several minutes) in $WASMTIME_TARGET"
T0=$(date +%s)
locked=()
[ -f "$REPO/nginx/wasmtime-capi/Cargo.lock" ] && locked=(--locked)
CARGO_BUILD_JOBS=$JOBS CARGO_TARGET_DIR=$WASMTIME_TARGET nice cargo build --release "${locked[@]}" \
    --manifest-path "$REPO/nginx/wasmtime-capi/Cargo.toml" ||
    fail "cargo build of the wasmtime C API failed (see above)"
T_WASMTIME=$(($(date +%s) - T0))
lib=$WASMTIME_TARGET/release/libwasmtime.a
[ -f "$lib" ] || fail "$lib was not produced"
# build.rs of wasmtime-c-api-impl installs the headers (wasm.h, wasi.h, wasmtime.h, wasmtime/*.h,
# generated wasmtime/conf.h) into its OUT_DIR/include; take the most recent one.
conf=$(ls -t "$WASMTIME_TARGET"/release/build/wasmtime-c-api-impl-*/out/include/wasmtime/conf.h 2>/dev/null | head -1)
[ -n "$conf" ] || fail "the wasmtime C API headers were not generated (cmake missing?)"
include_src=$(dirname "$(dirname "$conf")")

rm -rf "$PREFIX" "$PREFIX.build"
BUILD=$PREFIX.build
mkdir -p "$BUILD/wasmtime/lib" "$PREFIX"
cp -r "$include_src" "$BUILD/wasmtime/include"
cp "$lib" "$BUILD/wasmtime/lib/"
# wasmtime 26's build.rs does not pass WAT to cmake, so conf.h leaves WASMTIME_FEATURE_WAT
# undefined although the feature is compiled in; ngx_wasm_module needs wasmtime_wat2wasm.
if ! grep -q "^#define WASMTIME_FEATURE_WAT" "$BUILD/wasmtime/include/wasmtime/conf.h"; then
    sed -i 's|^/\* #undef WASMTIME_FEATURE_WAT \*/|#define WASMTIME_FEATURE_WAT|' "$BUILD/wasmtime/include/wasmtime/conf.h"
    grep -q "^#define WASMTIME_FEATURE_WAT" "$BUILD/wasmtime/include/wasmtime/conf.h" ||
        sed -i '0,/^#define WASMTIME_CONF_H/s||&\n#define WASMTIME_FEATURE_WAT|' "$BUILD/wasmtime/include/wasmtime/conf.h"
    grep -q "^#define WASMTIME_FEATURE_WAT" "$BUILD/wasmtime/include/wasmtime/conf.h" ||
        fail "could not define WASMTIME_FEATURE_WAT in wasmtime/conf.h"
fi

# --- nginx + ngx_wasm_module -----------------------------------------------------------------
tar -xzf "$SOURCES/$NGINX_TARBALL" -C "$BUILD"
tar -xzf "$SOURCES/$MODULE_TARBALL" -C "$BUILD"
NGINX_SRC=$BUILD/nginx-$NGINX_VERSION
MODULE_SRC=$BUILD/ngx_wasm_module
[ -d "$NGINX_SRC" ] && [ -d "$MODULE_SRC" ] || fail "unexpected layout in the tarballs (want nginx-$NGINX_VERSION/ and ngx_wasm_module/)"
# A `git archive` of nginx's tag has auto/configure; nginx.org's release tarballs have ./configure.
if [ -x "$NGINX_SRC/configure" ]; then CONFIGURE=./configure; else CONFIGURE=auto/configure; fi

log "configuring and building nginx $NGINX_VERSION with ngx_wasm_module $MODULE_VERSION"
T0=$(date +%s)
(
    cd "$NGINX_SRC"
    NGX_IPC=0 NGX_WASM_RUNTIME=wasmtime \
        NGX_WASM_RUNTIME_INC="$BUILD/wasmtime/include" \
        NGX_WASM_RUNTIME_LIB="$BUILD/wasmtime/lib" \
        NGX_WASM_RUNTIME_LD_OPT="$BUILD/wasmtime/lib/libwasmtime.a" \
        $CONFIGURE --prefix="$PREFIX" \
        --add-module="$MODULE_SRC" \
        --with-http_ssl_module \
        --with-http_stub_status_module \
        --with-http_realip_module \
        --with-http_v2_module \
        --with-threads >"$BUILD/configure.log" 2>&1 ||
        { tail -40 "$BUILD/configure.log" >&2; exit 1; }
    nice make -j"$JOBS" >"$BUILD/make.log" 2>&1 || { tail -40 "$BUILD/make.log" >&2; exit 1; }
    make install >"$BUILD/install.log" 2>&1 || { tail -20 "$BUILD/install.log" >&2; exit 1; }
) || fail "nginx configure/make failed (logs in $BUILD)"
T_NGINX=$(($(date +%s) - T0))

"$PREFIX/sbin/nginx" -V >/dev/null 2>&1 || fail "the built nginx does not run"
"$PREFIX/sbin/nginx" -V 2>&1 | grep -q ngx_wasm_module || log "warning: nginx -V does not mention ngx_wasm_module"
{
    echo "nginx $NGINX_VERSION, ngx_wasm_module $MODULE_VERSION, wasmtime $WASMTIME_VERSION, recipe $RECIPE"
    echo "built $(date -u +%FT%TZ): wasmtime C API ${T_WASMTIME}s, nginx ${T_NGINX}s, total $(($(date +%s) - START))s"
    "$PREFIX/sbin/nginx" -V 2>&1
} >"$PREFIX/.complete"
rm -rf "$BUILD"
link_result
log "built in $(($(date +%s) - START)) s (wasmtime C API ${T_WASMTIME} s, nginx ${T_NGINX} s)"
