#!/usr/bin/env bash
# resource-usage.sh: registers, stack and spills of every kernel entry point, from ptxas -v, for sm_90 (H100/H200)
# and sm_89 (RTX 4090); sm_80 (A100) is compiled and checked for spills but not tabled. Fails when any entry spills
# to local memory. Needs nvcc (`. ../shared/gpu/cuda-env.sh`).
#
#   kernels/tools/resource-usage.sh                 print the table, exit 1 on a spill
#   kernels/tools/resource-usage.sh --check-readme  also fail when README.md's table (between the ptxas markers)
#                                                   differs from this one
#   kernels/tools/resource-usage.sh --write-readme  rewrite README.md's table (temporary file, then rename)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
mode=${1:-}
nvcc=${NVCC:-nvcc}
command -v "$nvcc" >/dev/null || { echo "resource-usage: nvcc not found (. ../shared/gpu/cuda-env.sh)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

table="$work/table.md"
{
  echo "| kernel | arch | registers/thread | stack bytes | spill stores | spill loads | static smem bytes |"
  echo "|---|---|---:|---:|---:|---:|---:|"
} >"$table"
spills=0
for arch in 90 89; do
  for cu in kernels/cuda/*.cu; do
    log="$work/$(basename "$cu" .cu)_$arch.log"
    # Same flags as build.rs's PTX build, to a cubin so that ptxas runs and reports.
    "$nvcc" -cubin -arch="sm_$arch" -O3 -std=c++17 -Xptxas -v -I kernels/cuda -o "$work/k.cubin" "$cu" 2>"$log"
    # ptxas prints, per entry: "Compiling entry function 'NAME' for 'sm_XX'", "N bytes stack frame, S bytes spill
    # stores, L bytes spill loads", "Used R registers, ... M bytes smem".
    awk -v arch="sm_$arch" '
      /Compiling entry function/ { match($0, /function .[A-Za-z0-9_]+/); name = substr($0, RSTART + 10, RLENGTH - 10) }
      /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
      /Used [0-9]+ registers/ {
        regs = $5; smem = 0
        if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ bytes smem/, "", smem) }
        printf "| `%s` | %s | %s | %s | %s | %s | %s |\n", name, arch, regs, stack, st, ld, smem
      }' "$log" | sort >>"$table"
  done
done
cat "$table"
# sm_80 (A100, the oldest target with the tensor-core entries): compiled and checked for spills, not tabled.
for cu in kernels/cuda/*.cu; do
  log="$work/$(basename "$cu" .cu)_80.log"
  "$nvcc" -cubin -arch=sm_80 -O3 -std=c++17 -Xptxas -v -I kernels/cuda -o "$work/k.cubin" "$cu" 2>"$log"
  awk -v cu="$cu" '
    /Compiling entry function/ { match($0, /function .[A-Za-z0-9_]+/); name = substr($0, RSTART + 10, RLENGTH - 10) }
    /bytes stack frame/ && ($5 + 0 > 0 || $9 + 0 > 0) { printf "| `%s` | sm_80 | spills: %s bytes stored, %s loaded |\n", name, $5, $9 }
  ' "$log" >>"$work/spills80"
done
if [ -s "$work/spills80" ]; then
  cat "$work/spills80"
  echo "resource-usage: $(wc -l <"$work/spills80") kernel entries spill to local memory on sm_80" >&2
  exit 1
fi
echo "sm_80: every entry compiled, no spills"
spills=$(awk -F'|' 'NR > 2 && ($6 + 0 > 0 || $7 + 0 > 0) { n++ } END { print n + 0 }' "$table")
if [ "$spills" -gt 0 ]; then
  echo "resource-usage: $spills kernel entries spill to local memory (see the spill columns above)" >&2
  exit 1
fi
begin='<!-- ptxas:begin -->'
end='<!-- ptxas:end -->'
readme_table() { awk -v b="$begin" -v e="$end" '$0 == e { p = 0 } p { print } $0 == b { p = 1 }' README.md; }
case "$mode" in
  --check-readme)
    if ! diff -u <(readme_table) "$table" >"$work/diff"; then
      cat "$work/diff" >&2
      echo "resource-usage: README.md's ptxas table is stale: run kernels/tools/resource-usage.sh --write-readme" >&2
      exit 1
    fi ;;
  --write-readme)
    grep -qxF "$begin" README.md && grep -qxF "$end" README.md || { echo "resource-usage: README.md has no $begin/$end markers" >&2; exit 1; }
    tmp=$(mktemp README.md.XXXXXX)
    awk -v b="$begin" -v e="$end" -v t="$table" '
      $0 == b { print; while ((getline line < t) > 0) print line; skip = 1; next }
      $0 == e { skip = 0 }
      !skip { print }' README.md >"$tmp"
    chmod --reference=README.md "$tmp"
    mv "$tmp" README.md
    echo "resource-usage: README.md updated" ;;
  "") ;;
  *) echo "resource-usage: unknown option $mode" >&2; exit 2 ;;
esac
