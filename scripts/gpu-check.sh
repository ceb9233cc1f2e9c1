#!/usr/bin/env bash
# The prepared GPU check, for a GPU machine with the CUDA 13 driver and libraries but no Rust
# toolchain. Build first, on the development machine:
#
#   cargo xtask gpu-check --build        # release binaries into .gpu/ (git-ignored)
#
# then, on the GPU machine, from the repository root:
#
#   scripts/gpu-check.sh [--quick]       # arguments go to gpu_check
#
# It puts the CUDA 13 libraries on LD_LIBRARY_PATH (cudarc dlopens libcuda.so.1, libcublasLt.so.13
# by name): every `lib` folder of the `nvidia` pip wheels (nvidia/cu13/lib holds libcublasLt and
# libnvrtc in the cu13 layout), then /usr/local/nvidia/lib64 and /usr/local/cuda/lib64. It runs
# .gpu/gpu_check (every kernel and GEMM against the CPU, PASS/FAIL per kernel, then `fit` of the
# guide's model on the GPU per policy, checked against the CPU and timed, and the bf16 GEMM rate,
# as one markdown table) and every test binary in
# .gpu/tests/ with MP_REQUIRE_GPU=1 (GPU tests fail instead of skipping), all within about 5
# minutes, and keeps everything in gpu-check.log. Exit status: 0 when everything passed.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .gpu/gpu_check ]; then
  echo "no .gpu/gpu_check: run 'cargo xtask gpu-check --build' on the build machine first" >&2
  exit 2
fi

libs=$(python3 - <<'PY' 2>/dev/null
import os
try:
    import nvidia
except Exception:
    raise SystemExit(0)
dirs = []
for base in list(nvidia.__path__):
    for root, _, files in os.walk(base):
        if os.path.basename(root) == "lib" and any(".so" in f for f in files):
            dirs.append(root)
print(":".join(sorted(set(dirs))))
PY
)
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libs="${libs:+$libs:}$d"
done
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MP_REQUIRE_GPU=1

main() {
  local rc=0
  echo "== environment"
  nvidia-smi -L 2>&1 || echo "(nvidia-smi not found)"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  for lib in libcuda.so.1 libcublasLt.so.13 libcublas.so.13; do
    found=$( (IFS=:; for d in $LD_LIBRARY_PATH; do [ -e "$d/$lib" ] && echo "$d/$lib"; done) | head -n 1)
    [ -z "$found" ] && found=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}')
    echo "$lib: ${found:-NOT FOUND}"
  done
  echo
  echo "== gpu_check $*"
  timeout 240 .gpu/gpu_check "$@" || rc=1
  echo
  for t in .gpu/tests/*; do
    [ -x "$t" ] || continue
    echo "== $(basename "$t")"
    timeout 60 "$t" --test-threads=1 || rc=1
  done
  echo
  if [ "$rc" = 0 ]; then echo "GPU CHECK: ALL PASSED"; else echo "GPU CHECK: FAILURES (see above)"; fi
  return "$rc"
}

main "$@" 2>&1 | tee gpu-check.log
exit "${PIPESTATUS[0]}"
