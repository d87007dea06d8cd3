#!/usr/bin/env bash
# The GPU check, on a host with an NVIDIA GPU, Docker and the NVIDIA Container Toolkit:
# export bigG, build and validate TensorRT engines, serve them, then perf_analyzer at several batch
# sizes and concurrencies. Needs ~40 GB of disk (fp32 export + fp16 graphs + engines + images).
#   CLIP_PRETRAINED=/path/or/tag bash deploy/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
docker compose build
docker compose up -d triton            # export -> engines (validated vs PyTorch) -> triton
# Bounded: the first start exports bigG and builds its engines (tens of minutes; the bound is generous).
# A container that restarts (a crash loop: compose's restart policy) is a failure, not a wait.
timeout_s="${GPU_CHECK_TIMEOUT_S:-5400}"
deadline=$(( $(date +%s) + timeout_s ))
echo "[gpu-check] waiting up to ${timeout_s} s for triton to be healthy (GPU_CHECK_TIMEOUT_S)"
fail() {
    echo "[gpu-check] $1; its last log lines:" >&2
    docker compose logs --tail=60 triton >&2 || true
    exit 1
}
while :; do
    id=$(docker compose ps -aq triton)
    state=$(docker inspect -f '{{.State.Status}}|{{.State.Health.Status}}|{{.RestartCount}}' "$id")
    IFS='|' read -r status health restarts <<<"$state"
    case "${status:-} ${health:-}" in
        "running healthy") break ;;
        exited*|dead*|*" unhealthy") fail "triton is ${status} (${health})" ;;
        restarting*) fail "triton is restarting (a crash loop, restart count ${restarts:-?})" ;;
    esac
    if [ "${restarts:-0}" -gt 0 ]; then fail "triton restarted ${restarts} times while starting"; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then fail "triton is not healthy after ${timeout_s} s (state: $state)"; fi
    sleep "${GPU_CHECK_POLL_S:-10}"
done
docker compose run --rm sdk python -m clip_triton.gpucheck --url triton:8001 --repo /models/current "$@"
