#!/usr/bin/env bash
# The GPU check as one call of the project's device tool (docs/GPU_CHECK.md):
#
#   bash benchmarks/gpu_check_device.sh        # carry: [".whl"], timeout_s: 590
#
# Installs the carried wheels (make gpu-wheels) beside the machine's own packages, runs
# benchmarks/gpu_check.py inside the call's limit, and leaves in $OUT what the tool brings back
# (at most 8 files): gpu.md, gpu.json and the parts' logs as one archive. Arguments go to
# gpu_check.py. GPU_WHEELS (default .whl) and GPU_CHECK_TIMEOUT (seconds, default 580) override.
set -u
cd "$(dirname "$0")/.." || exit 1
out=${OUT:?set OUT, the folder whose files come back}
wheels=${GPU_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl || { echo "gpu_check_device: installing $wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
work=$(mktemp -d /tmp/gpu-check-out.XXXX)
timeout -k 5 "${GPU_CHECK_TIMEOUT:-580}" env PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" \
  python3 benchmarks/gpu_check.py --out "$work" "$@"
rc=$?
cp "$work"/gpu.md "$work"/gpu.json "$out"/ 2>/dev/null || echo "gpu_check_device: no report (exit $rc)" >&2
tar czf "$out/gpu_check_logs.tgz" -C "$work" gpu_check_logs
exit $rc
