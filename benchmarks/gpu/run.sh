#!/usr/bin/env bash
# GPU truth (issues 16, 28): install the carried wheels if needed, then measure everything into OUT_DIR.
#
#   bash benchmarks/gpu/run.sh OUT_DIR                    # on the GPU machine (about 6 minutes on one H200)
#   bash benchmarks/gpu/run.sh OUT_DIR --device cpu --tiny   # the dry run: same code paths, tiny shapes, CPU
#
# Extra arguments go to benchmarks/gpu/measure.py (--budget-s, --stages, --keep-work). Writes
# OUT_DIR/results.json, results.md, run.log (this whole output), estimates.json, pytest_cuda.log.
# Wheels: `make gpu-wheels` downloads into .whl/ the ones the GPU image lacks (bitsandbytes, pydantic, liger-kernel,
# ...); each is installed with pip --no-deps --target into $VELORA_GPU_SITE only when its module is missing (or older).
# PYTHON picks the interpreter (default python3, the one that holds torch on the GPU image).
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu/run.sh OUT_DIR [--device cpu --tiny] [measure.py options]" >&2
    exit 2
fi
OUT=$1
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
SITE=${VELORA_GPU_SITE:-/tmp/velora-gpu-site}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!
echo "== velora GPU truth: $(date -u +%FT%TZ) repo $REPO commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# Which carried wheels are needed: a wheel is installed when its top-level module cannot be imported, or is
# older than the carried one (pydantic needs typing_extensions >= 4.16).
WHEELS=()
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    mapfile -t WHEELS < <("$PY" - "$REPO"/.whl/*.whl <<'EOF'
import importlib.metadata as md
import importlib.util
import os
import sys

def key(v):
    return tuple(int(p) if p.isdigit() else 0 for p in v.split(".")[:3])

for wheel in sys.argv[1:]:
    dist, version = os.path.basename(wheel).split("-")[:2]
    module = dist.lower().replace("-", "_")
    try:
        have = md.version(dist)
    except md.PackageNotFoundError:
        have = None
    if importlib.util.find_spec(module) is None or have is None or key(have) < key(version):
        print(wheel)
EOF
)
fi
if [ ${#WHEELS[@]} -gt 0 ]; then
    echo "== installing ${#WHEELS[@]} carried wheel(s) into $SITE: ${WHEELS[*]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WHEELS[@]}" \
        || echo "== WARNING: pip install of the carried wheels failed"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "== no carried wheels needed (or none in .whl/)"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch, transformers, peft, bitsandbytes, pydantic; print('== torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__, '| pydantic', pydantic.__version__)" 2>&1 | grep -v kernels-community

# A carried Liger Kernel that cannot run here (Triton needs a C compiler for its launcher; a triton/torch mismatch)
# would fail every configuration apply_lean hands to it: smoke-test it once on CUDA, and if it fails, take it out
# of $SITE so the lean ops and the chunked loss run on their torch implementations (the ops stage then says so).
if [ -d "$SITE/liger_kernel" ] && "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    smoke=$("$PY" -c "
import torch
from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu
x = torch.randn(8, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True)
y = liger_rms_norm(x, torch.ones(64, device='cuda', dtype=torch.bfloat16), 1e-6, 0.0, 'llama', False)
(y.sum() + liger_swiglu(x, x).sum()).backward()
torch.cuda.synchronize()
print('ok')" 2>&1)
    if [ "$(echo "$smoke" | tail -1)" = "ok" ]; then
        echo "== liger-kernel smoke test on CUDA: ok"
    else
        echo "== WARNING: liger-kernel does not run here, removed from $SITE (torch ops instead): $(echo "$smoke" | tail -3)"
        rm -rf "$SITE"/liger_kernel "$SITE"/liger_kernel-*.dist-info
    fi
fi

started=$(date +%s)
"$PY" "$REPO/benchmarks/gpu/measure.py" "$OUT" "$@"
rc=$?
echo "== measure.py exited $rc after $(( $(date +%s) - started )) s; results: $OUT/results.json, $OUT/results.md"
exec >&- 2>&-  # let tee finish writing run.log before the caller collects OUT
wait "$TEE_PID" 2>/dev/null
exit $rc
