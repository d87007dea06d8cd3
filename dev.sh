#!/usr/bin/env bash
# clip-triton developer entry point.
#   bash dev.sh demo   install (once) into .venv, then run the offline main job (export, serve, classify)
#   bash dev.sh test   install (once) into .venv, then run the test suite (extra arguments go to pytest)
#   bash dev.sh install
set -euo pipefail
cd "$(dirname "$0")"
VENV="${CLIP_TRITON_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

install() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[dev] creating $VENV with $($PYTHON --version)"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.clip-triton-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/constraints.txt -nt "$stamp" ]; then
        echo "[dev] installing clip-triton[export,serve,cpu,test,bench,gateway,store] with pinned versions (torch is a ~6 GB CUDA build; runs on CPU)"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -c requirements/constraints.txt -e ".[export,serve,cpu,test,bench,gateway,store]"
        touch "$stamp"
    fi
    # perf_analyzer (in the tritonclient wheel) links Debian's libb64; the GPU twin renders
    # docker-compose.yml with Debian's docker-compose (offline, no Docker engine needed).
    ldconfig -p | grep -q "libb64.so.0d" || apt_install libb64-0d "perf_analyzer"
    command -v docker-compose >/dev/null || apt_install docker-compose "the compose twin (tests/test_gpu_twin.py)"
    # The KEDA/PodMonitor schemas generated from their CRDs (tests/test_kubernetes.py), pinned by lockfile.
    if command -v npm >/dev/null && [ ! -d tests/crd/node_modules ]; then
        echo "[dev] installing the CRD schemas for the Kubernetes tests (npm ci in tests/crd)"
        npm ci --prefix tests/crd --no-audit --no-fund --silent
    fi
}

apt_install() {  # package, what needs it
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[dev] installing $1 for $2"
        apt-get install -y -q "$1" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$1" >/dev/null; }
    else
        echo "[dev] note: $2 needs $1 (sudo apt-get install $1); those tests will say so"
    fi
}

command="${1:-}"
shift || true
case "$command" in
    install) install ;;
    demo) install; exec "$VENV/bin/clip-triton" demo "$@" ;;
    test) install; exec "$VENV/bin/python" -m pytest "$@" ;;
    *) echo "usage: bash dev.sh demo|test|install [args]" >&2; exit 2 ;;
esac
