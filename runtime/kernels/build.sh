#!/usr/bin/env bash
# Build build/libspikec_kernels.so, spikec's native kernels for onnxruntime (`make native`).
#
# onnxruntime's PyPI wheel ships no C headers. They come from Debian's libonnxruntime-dev (suite
# trixie), downloaded once with a private apt configuration into build/ort-headers: no root, no
# change to the system's apt state, nothing installed. A library built against older headers loads
# into a newer onnxruntime (it asks for the API version of its headers).
#
# Environment: ORT_INCLUDE=<dir with onnxruntime_cxx_api.h> skips the download; CXX picks the compiler;
# SPIKEC_BUILD_DIR moves build/.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${SPIKEC_BUILD_DIR:-$root/build}
headers=$build/ort-headers
include=${ORT_INCLUDE:-$headers/usr/include/onnxruntime}
suite=trixie
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

fail() { echo "spikec native build: $*" >&2; exit 1; }

fetch_headers() {
  command -v apt-get >/dev/null || fail "apt-get not found: cannot download libonnxruntime-dev headers (set ORT_INCLUDE to an onnxruntime include dir)"
  [ -f "$keyring" ] || fail "$keyring not found (package debian-archive-keyring): cannot verify Debian's archive"
  local apt=$build/.apt
  rm -rf "$apt"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/download" "$apt/parts"
  echo "deb [signed-by=$keyring] http://deb.debian.org/debian $suite main" > "$apt/sources.list"
  : > "$apt/status"
  # Every list, cache and state path is private; the system's sources and pins are not read.
  local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/parts"
              -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$apt/parts"
              -o "Dir::State::Lists=$apt/lists" -o "Dir::State::Status=$apt/status"
              -o "Dir::Cache=$apt/cache" -o APT::Architecture=amd64
              -o "APT::Sandbox::User=$(id -un)" -q)
  echo "spikec native build: downloading libonnxruntime-dev ($suite) headers into $headers"
  apt-get "${opts[@]}" --error-on=any update >"$apt/log" 2>&1 || fail "apt-get update of Debian $suite failed (network?), see $apt/log"
  (cd "$apt/download" && apt-get "${opts[@]}" download libonnxruntime-dev) >>"$apt/log" 2>&1 \
    || fail "downloading libonnxruntime-dev failed, see $apt/log"
  rm -rf "$headers"
  dpkg-deb -x "$apt"/download/libonnxruntime-dev_*.deb "$headers" || fail "cannot unpack libonnxruntime-dev"
  rm -rf "$apt"
  [ -f "$include/onnxruntime_cxx_api.h" ] || fail "libonnxruntime-dev has no onnxruntime_cxx_api.h under $include"
}

[ -f "$include/onnxruntime_cxx_api.h" ] || fetch_headers

mkdir -p "$build"
out=$build/libspikec_kernels.so
# runtime/native.py computes the same digest of the sources (sorted by name) and refuses a stale library
digest=$(cd "$root/runtime/kernels" && LC_ALL=C ls *.cc *.h | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)
# Same float32 arithmetic as the ONNX functions: no fast-math, no FMA contraction. -fno-trapping-math
# changes no value (it waives floating-point exception flags, which nothing reads) and lets floorf
# vectorize (roundps), which the integer ST-BIF+ neuron's half-up rounding needs.
"${CXX:-g++}" -std=c++20 -O3 -march=x86-64-v2 -ffp-contract=off -fno-trapping-math -fPIC -shared -fvisibility=hidden \
  -Wall -Wextra -DSPIKEC_SOURCE_DIGEST="\"$digest\"" -I"$include" ${SPIKEC_CXXFLAGS:-} "$root"/runtime/kernels/*.cc -o "$out.tmp" -pthread
mv -f "$out.tmp" "$out"  # atomic: a running process keeps the library it loaded
echo "spikec native build: $out (onnxruntime API $(sed -n 's/^#define ORT_API_VERSION \([0-9]*\).*/\1/p' "$include/onnxruntime_c_api.h"))"
