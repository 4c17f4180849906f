#!/usr/bin/env bash
# ASan + UBSan build of the compiled kernels, and the kernel tests run against it.
#
#   bash tools/sanitize.sh           # build a copy with SOTCORE_SANITIZE=1, run the tests
#   bash tools/sanitize.sh --plant   # same, with an out-of-bounds read planted in the
#                                    # scalar table sampler: the run must FAIL with an
#                                    # AddressSanitizer report (proves the tool sees it)
#
# pytest runs with -s: its capture of fd 2 would swallow a sanitizer report.
# Works on a copy in a temporary directory; the source tree is not touched.  Needs gcc
# with libasan/libubsan, and the test extras installed in the current Python.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
plant=0
[ "${1:-}" = "--plant" ] && plant=1
work="$(mktemp -d)"
trap '[ -n "${SOTCORE_KEEP:-}" ] || rm -rf "$work"' EXIT
cp "$root/setup.py" "$root/pyproject.toml" "$root/README.md" "$work/"
cp -r "$root/sotcore" "$root/tests" "$work/"
find "$work" \( -name '*.so' -o -name '_kernels.c' -o -name '__pycache__' \) -prune -exec rm -rf {} +
if [ "$plant" = 1 ]; then
    # read one table row too far: the last device's lookup runs off the table
    sed -i 's/o\[j\] = (uint8_t)(w < table\[j \* ldt + g\]);/o[j] = (uint8_t)(w < table[(j + 1) * ldt + g]);/' \
        "$work/sotcore/_sotrng.h"
    grep -q '(j + 1) \* ldt' "$work/sotcore/_sotrng.h" || { echo "plant failed"; exit 2; }
fi
cd "$work"
SOTCORE_SANITIZE=1 python setup.py -q build_ext --inplace >/dev/null
asan="$(gcc -print-file-name=libasan.so)"
ubsan="$(gcc -print-file-name=libubsan.so)"
set +e
LD_PRELOAD="$asan:$ubsan" ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" PYTHONPATH="$work" \
    python -m pytest -q -s -p no:cacheprovider -x tests/test_kernels.py tests/test_fused.py \
    > "$work/log.txt" 2>&1
rc=$?
set -e
tail -n 25 "$work/log.txt"
if grep -q "ERROR: AddressSanitizer\|runtime error:" "$work/log.txt"; then
    grep -m6 "ERROR: AddressSanitizer\|SUMMARY\|runtime error:\|    #0 " "$work/log.txt"
    echo "sanitize.sh: the sanitizers reported an error (exit $rc)"
    exit 1
fi
[ $rc -eq 0 ] && echo "sanitize.sh: kernel tests clean under ASan + UBSan"
exit $rc
