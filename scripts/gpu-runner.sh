#!/usr/bin/env bash
# The GPU-runner path (DESIGN §9): GPU machines have no Rust toolchain and no network, so
#
#   scripts/gpu-runner.sh bundle [DIR]   # on a build machine: build the test and bench
#                                        # binaries (kernels compiled by nvcc) into DIR
#   DIR/gpu-runner.sh run [--bench]      # on the GPU machine: run them and print a table
#
# `bundle` installs the pinned nvcc like CI does, builds with LORAFUSE_REQUIRE_NVCC=1 (so
# every binary embeds PTX and cubins), strips debug info, packs the binaries into
# bin.tar.xz (each embeds the same kernels and simulator, ~5 MB, so xz over all of them
# keeps the bundle ~8× smaller than the loose files) and checks the folder is under
# 64 MiB. `run` unpacks bin.tar.xz (tar, or Python's tarfile where tar lacks xz), runs
# every test binary with LORAFUSE_REQUIRE_GPU=1 (a missing GPU fails), then compute-sanitizer memcheck and racecheck over the kernel tests (those with `cuda`
# in their name), optionally the criterion benches (GPU groups) followed by the PyTorch +
# PEFT side by side (bench/pytorch/lora_kernels_gpu.py, train_step_gpu.py), and prints one summary table. Logs go
# to DIR/logs/. Tests that read the source tree (tests/architecture.rs, the tidy header
# check) or run the simulator's sanitizer builds (which stay on the build machine) are left
# to CI.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cmd="${1:-}"

bundle() {
    local repo out
    repo="$(cd "$here/.." && pwd)"
    out="$(mkdir -p "${1:-$repo/target/gpu-bundle}" && cd "${1:-$repo/target/gpu-bundle}" && pwd)"
    set -e
    cd "$repo"
    # shellcheck source=../.ci/cuda-env.sh
    source .ci/cuda-env.sh
    export LORAFUSE_REQUIRE_NVCC=1
    rm -rf "$out/bin" && mkdir -p "$out/bin"
    local list
    list="$(mktemp)"
    # Test binaries (test profile) and bench binaries (bench profile), by target name.
    for build in "cargo test --no-run" "cargo bench --no-run"; do
        $build --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"][0]
        name = m["target"]["name"]
        prefix = {"bench": "bench-", "bin": "test-bin-"}.get(kind, "test-")
        print(prefix + name, m["executable"])
' >> "$list"
    done
    while read -r name exe; do
        cp "$exe" "$out/bin/$name"
        strip --strip-debug "$out/bin/$name"
    done < "$list"
    rm -f "$list"
    rm -f "$out/bin.tar.xz"
    XZ_OPT="-6 -T0" tar -cJf "$out/bin.tar.xz" -C "$out" bin
    rm -rf "$out/bin"
    cp "$here/gpu-runner.sh" "$out/gpu-runner.sh"
    cp "$repo/bench/pytorch/lora_kernels_gpu.py" "$out/lora_kernels_gpu.py"
    cp "$repo/bench/pytorch/train_step_gpu.py" "$out/train_step_gpu.py"
    git rev-parse HEAD > "$out/COMMIT" 2>/dev/null || true
    local bytes
    bytes=$(du -sb "$out" | cut -f1)
    echo "bundle: $out ($((bytes / 1024 / 1024)) MiB)"
    tar -tvJf "$out/bin.tar.xz"
    if (( bytes >= 64 * 1024 * 1024 )); then
        echo "bundle: over 64 MiB" >&2
        exit 1
    fi
}

run() {
    local bench=0
    [[ "${1:-}" == "--bench" ]] && bench=1
    cd "$here"
    if [[ -f bin.tar.xz && ! -d bin ]]; then
        tar -xJf bin.tar.xz 2>/dev/null || python3 -c \
            'import tarfile; tarfile.open("bin.tar.xz").extractall(".")' || {
            echo "run: cannot unpack bin.tar.xz (no tar with xz, no python3)" >&2
            exit 1
        }
    fi
    mkdir -p logs
    export LORAFUSE_REQUIRE_GPU=1
    local rows=() failed=0
    step() { # name, command...
        local name="$1" log="logs/$1.log" start rc secs summary
        shift
        start=$(date +%s)
        "$@" > "$log" 2>&1
        rc=$?
        secs=$(( $(date +%s) - start ))
        summary="$(grep -E '^test result:|ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
        [[ $rc -ne 0 ]] && failed=1
        rows+=("$(printf '%-34s %-5s %5ss  %s' "$name" "$([[ $rc -eq 0 ]] && echo ok || echo FAIL)" "$secs" "$summary")")
        echo "${rows[-1]}"
    }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > logs/gpu.txt 2>&1
    echo "GPU: $(cat logs/gpu.txt)   commit: $(cat COMMIT 2>/dev/null)"
    for t in bin/test-*; do
        local name="${t#bin/}" skip=()
        [[ "$name" == test-architecture ]] && continue
        # Source-tree checks and the simulator's sanitizer victims (build-machine paths) are CI's.
        [[ "$name" == test-lorafuse ]] && skip=(--skip tidy::every_kernel_file_opens_with_its_header
            --skip sim_tests::address_sanitizer --skip sim_tests::thread_sanitizer)
        step "$name" "$t" "${skip[@]}"
    done
    local cs
    cs="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
    if [[ -x "$cs" ]]; then
        for tool in memcheck racecheck; do
            step "sanitizer-$tool" "$cs" --tool "$tool" --error-exitcode 1 \
                bin/test-lorafuse cuda --test-threads=1
        done
    else
        rows+=("compute-sanitizer                  FAIL  not found")
        failed=1
    fi
    if (( bench )); then
        # Criterion's results go under logs/criterion, where the side-by-side script reads
        # them; only the GPU groups run here (the CPU groups are the build machine's).
        export CRITERION_HOME="$here/logs/criterion"
        for b in bin/bench-*; do
            step "${b#bin/}" "$b" --bench cuda --warm-up-time 1 --measurement-time 3
        done
        if python3 -c "import torch, peft" > /dev/null 2>&1; then
            step side-by-side python3 lora_kernels_gpu.py --criterion "$CRITERION_HOME"
            step side-by-side-train python3 train_step_gpu.py --criterion "$CRITERION_HOME" \
                --ours-log logs/bench-train_step.log
        else
            rows+=("side-by-side                       FAIL  python3 with torch and peft not found")
            failed=1
        fi
    fi
    echo
    printf '%-34s %-5s %6s  %s\n' step result time summary
    printf '%s\n' "${rows[@]}"
    for f in logs/side-by-side.log logs/side-by-side-train.log; do
        if [[ -f "$f" ]]; then
            echo
            grep -v '^RESULT ' "$f"
        fi
    done
    exit $failed
}

case "$cmd" in
    bundle) shift; bundle "$@" ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 bundle [DIR] | run [--bench]" >&2; exit 2 ;;
esac
