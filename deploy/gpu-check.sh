#!/usr/bin/env bash
# The GPU check, on a host with an NVIDIA GPU, Docker and the NVIDIA Container Toolkit:
# export bigG, build and validate TensorRT engines, serve them, then perf_analyzer at several batch
# sizes and concurrencies. Needs ~40 GB of disk (fp32 export + fp16 graphs + engines + images).
#   CLIP_PRETRAINED=/path/or/tag bash deploy/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
docker compose build
docker compose up -d triton            # export -> engines (validated vs PyTorch) -> triton
echo "[gpu-check] waiting for triton to be healthy"
while :; do
    state=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$(docker compose ps -aq triton)")
    case "$state" in
        "running healthy") break ;;
        exited*|dead*|*" unhealthy")
            echo "[gpu-check] triton is $state; its last log lines:" >&2
            docker compose logs --tail=60 triton >&2
            exit 1 ;;
    esac
    sleep 10
done
docker compose run --rm sdk python -m clip_triton.gpucheck --url triton:8001 --repo /models "$@"
