#!/usr/bin/env bash
# The GPU kit in one command: proves every GPU path of devops-model and measures it, then writes
# $OUT/gpu-report.md and $OUT/gpu-report.json (or --out DIR; else runs/gpu-kit/).
#
#   bash bench/gpu/run.sh                 # on a GPU machine (the device tool: see docs/development/gpu-kit.md)
#   bash bench/gpu/run.sh --plan          # CPU dry mode: every step on CPU with tiny shapes, < 3 min
#   options: --out DIR  --budget SECONDS (whole command; default 450, 170 with --plan)  --only STEP,...
#            --step-scale F (each step's own budget x F: a slow or busy machine)
#
# Uses the machine's own python3 (or $PYTHON) and nothing beyond the carried wheels in .whl/ (made
# by bench/gpu/wheels.sh): they go to /tmp/devops-gpu-site with pip --no-index --no-deps and lead
# PYTHONPATH. Exit code: 0 every check passed, 1 a check failed or a step crashed, 2 bad arguments,
# 3 the carried wheels did not install.
set -u
cd "$(dirname "$0")/../.."
export DEVOPS_GPU_KIT_T0=${DEVOPS_GPU_KIT_T0:-$(date +%s)}
PY=${PYTHON:-python3}
plan=0
for a in "$@"; do [ "$a" = --plan ] && plan=1; done
SITE=/tmp/devops-gpu-site
if [ $plan = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  t=$(date +%s)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl \
    || { echo "error: the carried wheels (.whl/) did not install with $PY"; exit 3; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  # pypcre (gptqmodel's regex engine) publishes no wheels: build it here from its carried source
  if compgen -G ".whl/src/pypcre-*.tar.gz" >/dev/null && ! $PY -c "import pcre" 2>/dev/null; then
    rm -rf /tmp/devops-gpu-pcre
    if timeout 120 $PY -m pip wheel -q --no-index --no-deps --no-build-isolation -w /tmp/devops-gpu-pcre \
         .whl/src/pypcre-*.tar.gz >/tmp/devops-gpu-pcre.log 2>&1; then
      $PY -m pip install -q --no-index --no-deps --no-compile --target $SITE --upgrade /tmp/devops-gpu-pcre/*.whl
    else
      echo "pypcre did not build here ($(tail -1 /tmp/devops-gpu-pcre.log)): the GPTQ test will say it skipped"
    fi
  fi
  echo "carried wheels installed in $(( $(date +%s) - t )) s"
fi
exec $PY bench/gpu/runner.py "$@"
