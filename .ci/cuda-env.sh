# Sourced by .ci/run and scripts/gpu-runner.sh: installs the CUDA 13.0 compiler pieces
# from PyPI (DESIGN §8) into a cache folder once, then exports NVCC and puts libnvrtc on
# LD_LIBRARY_PATH. Pinned to the GPU machines' CUDA 13.0 driver (PTX ISA 9.0): every piece
# is pinned, since an unpinned nvvm resolves to a newer release whose PTX that driver
# rejects. Needs python3 (venv, pip) and gcc (nvcc's host compiler).
CUDA_PINS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-nvvm==13.0.88
    nvidia-cuda-nvrtc==13.0.88
)
CUDA_VENV="${LORAFUSE_CUDA_CACHE:-$HOME/.cache/lorafuse-cuda}"
if [[ ! -f "$CUDA_VENV/.lorafuse-pins" || "$(cat "$CUDA_VENV/.lorafuse-pins")" != "${CUDA_PINS[*]}" ]]; then
    echo "== installing the CUDA toolchain into $CUDA_VENV: ${CUDA_PINS[*]}"
    rm -rf "$CUDA_VENV"
    python3 -m venv "$CUDA_VENV"
    "$CUDA_VENV/bin/pip" install --quiet --disable-pip-version-check "${CUDA_PINS[@]}"
    echo "${CUDA_PINS[*]}" > "$CUDA_VENV/.lorafuse-pins"
fi
CU13="$(echo "$CUDA_VENV"/lib/python3*/site-packages/nvidia/cu13)"
export NVCC="$CU13/bin/nvcc"
# Never the toolkit's lib64/stubs here: a stub libcuda would win over the real driver.
export LD_LIBRARY_PATH="$CU13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== $("$NVCC" --version | grep release)"
