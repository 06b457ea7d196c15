#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine lacks, for Python 3.12 / manylinux x86-64, and
# link the DevOps exam as .exam so that the device tool's carry can take it along (never copied into
# the repository). Prints the size of what travels.
#
#   bash bench/gpu/wheels.sh            (here, where pip reaches the package index; a few minutes)
#
# Carried (the machine has torch 2.11, transformers 5.17, peft, accelerate; not datasets, deepspeed,
# optimum, gptqmodel, prompt_toolkit): the tested transformers/peft of requirements.lock (the code is
# tested on 5.24, not 5.17), datasets and the two of its needs that are missing, deepspeed built here
# with DS_BUILD_OPS=0 (pure Python; ops would JIT-compile there) and its missing needs, optimum and
# gptqmodel (built here without CUDA extensions) with theirs, and pypcre's source (no wheels exist; run.sh
# builds it there). Not carried: torchao (gptqmodel imports it only for formats the kit does not use),
# bitsandbytes, fastapi/uvicorn (serve is not part of this kit), openai, trl.
set -eu
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
W=.whl
mkdir -p $W/src /tmp/devops-gpu-wheels
pin() { grep -i "^$1==" requirements.lock | head -1; }
PLAT="--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d $W"
# shellcheck disable=SC2046
$PY -m pip download -q $PLAT $(for p in transformers peft datasets dill multiprocess hjson pydantic pydantic_core \
    annotated-types typing-inspection optimum prompt_toolkit wcwidth; do pin $p; done)
# liger-kernel (pure Python over Triton, which the GPU machine's torch brings): the kit's last step
$PY -m pip download -q $PLAT liger-kernel==0.8.5
# pure-Python wheels built here from source distributions (they publish no wheels)
src() { $PY -m pip download -q --no-deps --no-build-isolation -d /tmp/devops-gpu-wheels "$(pin "$1")"; }
for p in deepspeed GPTQModel Defuser Device-SMI LogBar TokeNicer PyPcre; do src $p; done
for f in /tmp/devops-gpu-wheels/*.tar.gz; do
  case $(basename "$f") in
    pypcre-*) cp "$f" $W/src/ ;;  # a C extension for Python 3.12: built on the GPU machine by run.sh
    *) DS_BUILD_OPS=0 BUILD_CUDA_EXT=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w $W "$f" ;;
  esac
done
exam=$(cd .. && pwd)/shared/data/devops-exam
if [ -d "$exam/cmmlu" ] && [ ! -e .exam ]; then ln -s "$exam" .exam; fi
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carry=$(du -cbL $W .exam 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $(ls $W/*.whl | wc -l) in $W/ + $(ls $W/src | wc -l) source; tree $((tree / 1024)) KiB + carry $((carry / 1024)) KiB = $(((tree + carry) / 1048576)) MiB of the 64 MiB"
