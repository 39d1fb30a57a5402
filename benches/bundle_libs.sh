#!/usr/bin/env bash
# Copies into DIR/lib the shared libraries the binaries in DIR need beyond the base system and
# libtorch (libhdf5 and its dependencies), so they start on a machine that has PyTorch but not
# this machine's packages.
set -euo pipefail
dir=$1
mkdir -p "$dir/lib"
base='^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|libresolv)\.so'
for bin in "$dir"/neurofm-* "$dir"/allreduce_bench; do
  ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r name path; do
    case "$path" in */torch/*|*/site-packages/*) continue ;; esac
    [[ $name =~ $base ]] && continue
    cp -Ln "$path" "$dir/lib/$name" 2>/dev/null || true
  done
done
