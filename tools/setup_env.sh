#!/usr/bin/env bash
# Install mmcd's pinned stack into the current Python environment.
#
#   bash tools/setup_env.sh            # PYTHON=python3.11 to choose the interpreter
#
# Idempotent: it checks first and installs only what is missing (a second run
# takes seconds). Order matters: torch (only when no torch is present; a
# bare `torch` requirement would pull a multi-GB CUDA build), then build tools,
# then mmcv 2.1.0 with compiled ops (a wheel from PIP_FIND_LINKS when one is
# given, otherwise built from source against the installed torch: ~7 min on 2
# cores), then mmengine/mmdet/test deps, the ONNX deployment deps
# (requirements/deploy.txt; mmdeploy without its pins,
# requirements/mmdeploy.txt), then mmcd itself (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
log() { echo "[setup_env] $*"; }

# PIP_FIND_LINKS replaces pip's configured find-links (where a machine may keep
# its torch wheel) instead of adding to it: keep both.
if [ -n "${PIP_FIND_LINKS:-}" ]; then
  configured=$("$PY" -m pip config get global.find-links 2>/dev/null || true)
  [ -n "$configured" ] && export PIP_FIND_LINKS="$PIP_FIND_LINKS $configured"
fi

missing() {
  (cd / && "$PY" - "$OLDPWD" <<'PYEOF'
import os, sys, warnings
warnings.filterwarnings('ignore')
repo = sys.argv[1]
from importlib.metadata import PackageNotFoundError, version as dist_version
def version(dist):
    try:
        return dist_version(dist)
    except PackageNotFoundError:
        return None
need = []
if version('torch') is None:
    need.append('torch')
st = version('setuptools')
if st is None or not (77, 0) <= tuple(int(x) for x in st.split('.')[:2]) < (82, 0):
    need.append('build')
try:
    import mmcv, mmcv.ops  # noqa: F401  (mmcv.ops needs the compiled _ext)
    if mmcv.__version__ != '2.1.0':
        need.append('mmcv')
except Exception:
    need.append('mmcv')
if (version('mmengine'), version('mmdet')) != ('0.10.7', '3.3.0') or any(
        version(m) is None for m in ('pycocotools', 'matplotlib', 'pytest',
                                   'pytest-xdist')):
    need.append('deps')
if any(version(m) is None for m in ('onnx', 'onnxruntime', 'onnxscript')):
    need.append('deploy')
if version('mmdeploy') != '1.3.1':
    need.append('mmdeploy')
try:
    import mmcd
    if os.path.realpath(os.path.dirname(mmcd.__file__)) != os.path.realpath(
            os.path.join(repo, 'mmcd')):
        need.append('mmcd')
except Exception:
    need.append('mmcd')
print(' '.join(need))
PYEOF
  )
}

need=$(missing)
if [ -z "$need" ]; then
  log "environment ready (torch, mmcv with ops, mmengine, mmdet, onnx, mmdeploy, mmcd)"
  exit 0
fi
log "installing: $need"
case " $need " in *" torch "*)
  pip_install torch==2.13.0 ;; esac
case " $need " in *" build "*|*" mmcv "*)
  pip_install -r requirements/build.txt ;; esac
case " $need " in *" mmcv "*)
  # A wheel in PIP_FIND_LINKS wins; otherwise pip builds the sdist.
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    pip_install --no-build-isolation mmcv==2.1.0 ;; esac
case " $need " in *" deps "*)
  pip_install -r requirements/runtime.txt -r requirements/tests.txt ;; esac
case " $need " in *" deploy "*)
  pip_install -r requirements/deploy.txt ;; esac
case " $need " in *" mmdeploy "*)
  # --no-deps: requirements/mmdeploy.txt says why
  pip_install --no-deps -r requirements/mmdeploy.txt ;; esac
case " $need " in *" mmcd "*)
  pip_install --no-build-isolation --no-deps -e . ;; esac
need=$(missing)
if [ -n "$need" ]; then
  log "still missing after install: $need" >&2
  exit 1
fi
log "environment ready"
