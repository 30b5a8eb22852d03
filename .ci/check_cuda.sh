#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for sm_80 and sm_90 with the ptxas report; fail on any compile error or any register
# spill. Nothing built here runs (no GPU on CI): this is what keeps the CUDA backend compiling and spill-free.
#   NVCC=... to pick the compiler, ARCHS="80 90" to change the targets, VERBOSE=1 to list every kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=${ARCHS:-"80 90"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

command -v "$NVCC" >/dev/null || { echo "check_cuda: $NVCC not found" >&2; exit 2; }
"$NVCC" --version | tail -1

# All compiles in parallel (one process per file and arch); each writes its own log and exit status.
for f in csrc/cuda/*.cu; do
  for a in $ARCHS; do
    b=$(basename "$f" .cu)_sm$a
    ( "$NVCC" -O3 -std=c++17 -Xcompiler -fPIC -I csrc/include -gencode "arch=compute_$a,code=sm_$a" -Xptxas -v \
        -c "$f" -o "$tmp/$b.o" >"$tmp/$b.log" 2>&1; echo $? >"$tmp/$b.rc" ) &
  done
done
wait

status=0
for f in csrc/cuda/*.cu; do
  for a in $ARCHS; do
    b=$(basename "$f" .cu)_sm$a
    if [ "$(cat "$tmp/$b.rc")" != 0 ]; then
      echo "FAIL  $f sm_$a: compile error"; grep -E "error|warning" "$tmp/$b.log" | head -20; status=1; continue
    fi
    if grep -qiE "warning" "$tmp/$b.log"; then
      echo "WARN  $f sm_$a:"; grep -iE "warning" "$tmp/$b.log" | head -10
    fi
    # One line per kernel: name, registers, spill stores, spill loads (ptxas prints them in this order).
    awk -v verbose="${VERBOSE:-0}" -v file="$f" -v arch="sm_$a" '
      /Compiling entry function/ { match($0, /function \047[^\047]+\047/); name = substr($0, RSTART + 10, RLENGTH - 11) }
      /bytes spill stores/ { st = $5; ld = $9 }
      /Used [0-9]+ registers/ {
        regs = $5; n++; if (regs > maxr) maxr = regs; if (minr == "" || regs < minr) minr = regs
        if (st + ld > 0) { bad++; print "SPILL " file " " arch " regs=" regs " stores=" st " loads=" ld " " name }
        else if (verbose == "1") print "      " arch " regs=" regs " " name
      }
      END {
        printf "%s  %-26s %s  %3d kernels, registers %s..%s, %s\n", (bad ? "FAIL" : "ok  "), file, arch, n, minr, maxr,
               (bad ? bad " spilling" : "no spills")
        exit (bad ? 1 : 0)
      }' "$tmp/$b.log" | { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
done
[ $status = 0 ] && echo "check_cuda: all kernels compile without spills" || echo "check_cuda: FAILED"
exit $status
