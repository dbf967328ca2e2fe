#!/usr/bin/env bash
# The GPU-runner path (DESIGN §9): GPU machines have no Rust toolchain and no network, so
#
#   scripts/gpu-runner.sh bundle [DIR]   # on a build machine: build the test and bench
#                                        # binaries (kernels compiled by nvcc) into DIR
#   DIR/gpu-runner.sh run [--quick]      # on the GPU machine: run them, print one table
#
# `bundle` installs the pinned nvcc like CI does, builds with LORAFUSE_REQUIRE_NVCC=1 (so
# every binary embeds PTX and cubins): the test binaries from `cargo test --no-run` (test
# profile: debug assertions, so device buffers are NaN-poisoned and every launch is
# checked) and, from `cargo bench --no-run`, only the bench targets (`kind == "bench"`;
# its lib and bin test harnesses, release builds, would otherwise overwrite the test
# ones). It strips debug info, packs the binaries into bin.tar.xz (each embeds the same
# kernels and simulator, so xz over all of them keeps the bundle small) and checks the
# folder is under 64 MiB.
#
# `run` is budgeted: the whole check in <= 8 minutes, `--quick` in <= 3, start to table.
# Every step has a timeout, and a step that would pass the budget is not started (its row
# says so). The steps, in order:
#   first-contact  within seconds: nvidia-smi answers (GPU, driver, memory), the glibc
#                  here and at build time, every binary loads (`ldd`, then `--list`),
#                  where cuBLAS is (PyTorch's site-packages/nvidia/cu13/lib, put on
#                  LD_LIBRARY_PATH and in LORAFUSE_CUBLAS_DIR), compute-sanitizer
#   tests-sync     the GPU tests (names with cuda, gpu or cublas) of every test binary,
#                  --test-threads=1 with LORAFUSE_CUDA_SYNC=1: a sticky fault names its
#                  own test. LORAFUSE_REQUIRE_GPU=1, so a missing GPU fails.
#   sass-hgmma     cuobjdump --dump-sass of the bundled sm_90a cubins (the Hopper kernels):
#                  each must contain HGMMA (wgmma), FAIL if only HMMA; `unavailable`
#                  without cuobjdump
#   bench-lora_matmul, bench-train_step   the headline benches (criterion, GPU groups;
#                  the lora_matmul group has the Hopper path, the sm_80 path and cuBLAS)
#   --- the rest is skipped by --quick ---
#   tests-async    the GPU tests again, in parallel and without the per-launch sync
#   sanitizer-*    compute-sanitizer memcheck and racecheck over a few kernel tests; a
#                  sanitizer that is missing or cannot attach to the device is
#                  `unavailable`, not a failure, unless LORAFUSE_REQUIRE_SANITIZER=1
#   bench-adamw, bench-merge, then the PyTorch + PEFT side by side
#                  (lora_kernels_gpu.py, train_step_gpu.py) over criterion's results
# cuBLAS (the GEMM baseline) missing prints `skipped (no cuBLAS)` unless
# LORAFUSE_REQUIRE_CUBLAS=1. Logs go to DIR/logs/. The CPU and simulator tests, and those
# that read the source tree, are CI's (they ran on the build machine for this commit).
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
    rm -rf "${out:?}/bin" && mkdir -p "$out/bin"
    local list
    list="$(mktemp)"
    # Test binaries (test profile) by target name; from the bench build only the benches.
    local want build
    for want in test bench; do
        if [[ $want == test ]]; then build=(cargo test --no-run); else build=(cargo bench --no-run --benches); fi
        "${build[@]}" --message-format=json 2>/dev/null | python3 -c '
import json, sys
want = sys.argv[1]
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    kind = m["target"]["kind"][0]
    name = m["target"]["name"]
    if (kind == "bench") != (want == "bench"):
        continue
    prefix = {"bench": "bench-", "bin": "test-bin-"}.get(kind, "test-")
    print(prefix + name, m["executable"])
' "$want" >> "$list"
    done
    # The Hopper kernels' sm_90a cubins, for the SASS check of `run` (the binaries embed them
    # as bytes, which cuobjdump cannot read): from the test build's OUT_DIR.
    rm -rf "${out:?}/cubins" && mkdir -p "$out/cubins"
    local out_dir
    out_dir="$(cargo test --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") != "build-script-executed":
        continue
    # package ids: path+file:///dir#lorafuse@0.1.0, or path+file:///lorafuse#0.1.0
    pid = m.get("package_id", "")
    frag = pid.split("#")[-1]
    name = frag.split("@")[0] if "@" in frag else pid.split("#")[0].rstrip("/").split("/")[-1]
    if name == "lorafuse":
        print(m["out_dir"])
' | tail -1)"
    if [[ -z "$out_dir" ]]; then
        echo "bundle: cargo reported no OUT_DIR for lorafuse's build script" >&2
        exit 1
    fi
    cp "$out_dir"/*.sm_90a.cubin "$out/cubins/"
    while read -r name exe; do
        cp "$exe" "$out/bin/$name"
        strip --strip-debug "$out/bin/$name"
    done < "$list"
    rm -f "$list"
    rm -f "$out/bin.tar.xz"
    XZ_OPT="-6 -T0" tar -cJf "$out/bin.tar.xz" -C "$out" bin
    rm -rf "${out:?}/bin"
    cp "$here/gpu-runner.sh" "$out/gpu-runner.sh"
    cp "$repo/bench/pytorch/lora_kernels_gpu.py" "$out/lora_kernels_gpu.py"
    cp "$repo/bench/pytorch/train_step_gpu.py" "$out/train_step_gpu.py"
    cp "$repo/bench/pytorch/step_kernels_gpu.py" "$out/step_kernels_gpu.py"
    git rev-parse HEAD > "$out/COMMIT" 2>/dev/null || true
    echo "built $(date -u +%FT%TZ) on $(uname -srm), $(ldd --version 2>&1 | head -1)" > "$out/BUILD"
    local bytes
    bytes=$(du -sb "$out" | cut -f1)
    echo "bundle: $out ($((bytes / 1024 / 1024)) MiB, $bytes bytes)"
    tar -tvJf "$out/bin.tar.xz"
    if (( bytes >= 64 * 1024 * 1024 )); then
        echo "bundle: over 64 MiB" >&2
        exit 1
    fi
}

run() {
    local quick=0 arg
    for arg in "$@"; do
        case "$arg" in
            --quick) quick=1 ;;
            --bench) ;; # the full run always benches (kept for old command lines)
            *) echo "run: unknown option $arg (expected --quick)" >&2; exit 2 ;;
        esac
    done
    cd "$here" || exit 1
    local t0 budget
    t0=$(date +%s)
    budget=$(( quick ? 180 : 480 ))
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
    row() { # name result secs summary
        rows+=("$(printf '%-30s %-11s %5ss  %s' "$1" "$2" "$3" "$4")")
        echo "${rows[-1]}"
        case "$2" in ok | skipped | unavailable) ;; *) failed=1 ;; esac
    }
    # step NAME TIMEOUT COMMAND...: runs COMMAND under a timeout cut to what is left of
    # the budget (a step with under 10 s left is not started), logs to logs/NAME.log.
    step() {
        local name="$1" limit="$2" log="logs/$1.log" start rc secs summary left result
        shift 2
        left=$(( budget - ($(date +%s) - t0) - 5 ))
        if (( left < 10 )); then
            row "$name" "not-run" 0 "over the ${budget}s budget"
            return 1
        fi
        (( limit > left )) && limit=$left
        start=$(date +%s)
        timeout -k 5 "$limit" "$@" > "$log" 2>&1
        rc=$?
        secs=$(( $(date +%s) - start ))
        summary="$(grep -E '^test result:|ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
        local skipped
        skipped="$(grep -c '^lorafuse: SKIPPED' "$log")"
        (( skipped > 0 )) && summary="$summary; $skipped SKIPPED (see log)"
        # A bench without a GPU prints `<group>/cuda: skipped (...)` and exits 0.
        if [[ $rc -eq 0 && "$name" == bench-* ]] && grep -q '/cuda: skipped' "$log"; then
            rc=1
            summary="the GPU group did not run: $(grep -m1 '/cuda: skipped' "$log" | cut -c1-80)"
        fi
        case $rc in
            0) result=ok ;;
            124 | 137) result=TIMEOUT; summary="after ${limit}s; $summary" ;;
            *) result=FAIL ;;
        esac
        row "$name" "$result" "$secs" "$summary"
        [[ $rc -eq 0 ]]
    }

    # --- first contact: the GPU answers, the binaries load --------------------------
    local fc=logs/first-contact.log start ok=1 gpu driver
    start=$(date +%s)
    {
        echo "commit: $(cat COMMIT 2>/dev/null)"
        cat BUILD 2>/dev/null
        echo "runner: $(uname -srm), $(ldd --version 2>&1 | head -1)"
    } > "$fc"
    if gpu="$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
        --format=csv,noheader 2>&1)"; then
        driver="$(echo "$gpu" | head -1 | cut -d, -f2 | tr -d ' ')"
        echo "GPU: $gpu" >> "$fc"
        if [[ ! "${driver%%.*}" =~ ^[0-9]+$ ]] || (( ${driver%%.*} < 580 )); then
            echo "driver $driver: not CUDA 13.0's 580 or newer" >> "$fc"
            ok=0
        fi
    else
        echo "nvidia-smi failed: $gpu" >> "$fc"
        gpu="nvidia-smi failed"
        ok=0
    fi
    local b missing
    for b in bin/*; do
        missing="$(ldd "$b" 2>&1 | grep 'not found')"
        if [[ -n "$missing" ]]; then
            echo "$b: $missing" >> "$fc"
            ok=0
        elif ! timeout 20 "$b" --list > /dev/null 2>> "$fc"; then
            echo "$b: does not run (--list)" >> "$fc"
            ok=0
        fi
    done
    # cuBLAS and NVRTC from the image's PyTorch (its pip nvidia/ libraries).
    local cu13
    cu13="$(timeout 30 python3 -c '
import os, nvidia
for p in nvidia.__path__:
    for d in (os.path.join(p, "cu13", "lib"), os.path.join(p, "cublas", "lib")):
        if os.path.isfile(os.path.join(d, "libcublas.so.13")):
            print(d)
            raise SystemExit
' 2>/dev/null)"
    if [[ -n "$cu13" ]]; then
        export LORAFUSE_CUBLAS_DIR="$cu13"
        export LD_LIBRARY_PATH="$cu13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "cuBLAS: $cu13" >> "$fc"
    else
        echo "cuBLAS: not found under python3's nvidia packages (tests print skipped (no cuBLAS))" >> "$fc"
    fi
    local cs
    cs="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
    if [[ -x "$cs" ]]; then
        echo "compute-sanitizer: $cs ($("$cs" --version 2>&1 | tail -1))" >> "$fc"
    else
        echo "compute-sanitizer: not found" >> "$fc"
        cs=""
    fi
    cat "$fc"
    row first-contact "$( ((ok)) && echo ok || echo FAIL)" $(( $(date +%s) - start )) \
        "$(echo "$gpu" | head -1); $(find bin -type f | wc -l) binaries"
    if ! ls bin/test-* > /dev/null 2>&1; then
        echo "run: no test binaries in bin/" >&2
        exit 1
    fi

    # --- the GPU tests, one at a time, synchronising after every launch -----------------
    local filters=(cuda gpu cublas) t name limit
    for t in bin/test-*; do
        name="${t#bin/test-}"
        [[ "$name" == architecture || "$name" == training || "$name" == allocation ]] && continue
        case "$name" in lorafuse) limit=$(( quick ? 110 : 150 )) ;; *) limit=75 ;; esac
        step "tests-sync-$name" "$limit" env LORAFUSE_CUDA_SYNC=1 "$t" "${filters[@]}" --test-threads=1
    done

    # --- the Hopper kernels run Hopper code: HGMMA in their SASS, not only HMMA ------------
    local objdump
    objdump="$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)"
    if ! ls cubins/*.sm_90a.cubin > /dev/null 2>&1; then
        row sass-hgmma FAIL 0 "no sm_90a cubins in the bundle"
    elif [[ ! -x "$objdump" ]]; then
        row sass-hgmma unavailable 0 "cuobjdump not found"
    else
        step sass-hgmma 30 bash "$here/gpu-runner.sh" sass "$objdump" cubins/*.sm_90a.cubin
    fi

    # --- the headline benches ---------------------------------------------------------
    # Criterion's results go under logs/criterion, where the side-by-side scripts read
    # them; only the GPU groups run here.
    export CRITERION_HOME="$here/logs/criterion"
    local crit=(--bench --warm-up-time 1 --measurement-time 2)
    [[ -x bin/bench-lora_matmul ]] && step bench-lora_matmul 60 bin/bench-lora_matmul lora_matmul/cuda "${crit[@]}"
    [[ -x bin/bench-train_step ]] && step bench-train_step 60 bin/bench-train_step train_step/cuda "${crit[@]}"

    if (( ! quick )); then
        # --- the GPU tests again, in parallel, without the per-launch sync -------------
        for t in bin/test-*; do
            name="${t#bin/test-}"
            [[ "$name" == architecture || "$name" == training || "$name" == allocation ]] && continue
            step "tests-async-$name" 90 "$t" "${filters[@]}"
        done

        # --- compute-sanitizer over a few kernel tests --------------------------------
        local probe=device::cuda::tests::copies_round_trip_on_the_gpu subset
        subset="$(bin/test-lorafuse --list 2>/dev/null | sed -n 's/: test$//p' |
            grep -E '^ops::(elementwise|layer_norm|attention|cross_entropy)::kernel_tests::[a-z_]+::cuda$' |
            head -6 | tr '\n' ' ')"
        if [[ -z "$cs" ]]; then
            sanitizer_unavailable "compute-sanitizer not found"
        else
            # Probe the tool on one small test that tests-sync ran: if it fails there
            # without reporting an error in our code, the tool (not the code) failed.
            local rc=0
            if (( budget - ($(date +%s) - t0) < 60 )); then
                row sanitizer not-run 0 "over the ${budget}s budget"
                rc=-1
            fi
            (( rc == 0 )) && timeout -k 5 45 "$cs" --tool memcheck --error-exitcode 1 \
                bin/test-lorafuse --exact "$probe" --test-threads=1 > logs/sanitizer-probe.log 2>&1 || rc=$?
            if (( rc == 0 )); then
                # shellcheck disable=SC2086 # the subset is a list of test names
                step sanitizer-memcheck 75 "$cs" --tool memcheck --error-exitcode 1 \
                    bin/test-lorafuse --exact $subset --test-threads=1
                # shellcheck disable=SC2086
                step sanitizer-racecheck 90 "$cs" --tool racecheck --error-exitcode 1 \
                    bin/test-lorafuse --exact $subset --test-threads=1
            elif (( rc < 0 )); then
                : # not started
            elif grep -qE 'ERROR SUMMARY: [1-9]' logs/sanitizer-probe.log; then
                row sanitizer-probe FAIL 0 "$(grep -m1 'ERROR SUMMARY' logs/sanitizer-probe.log)"
            else
                sanitizer_unavailable "rc $rc: $(grep -m1 -iE 'error|unable|not supported|fail' \
                    logs/sanitizer-probe.log | cut -c1-90)"
            fi
        fi

        # --- the other benches and the PyTorch side by side ---------------------------
        # The step's kernels at the GPT-2 124M shapes (issue 12): each GEMM, attention,
        # the split-K LoRA reductions and the memory-bound passes.
        [[ -x bin/bench-lora_matmul ]] && step bench-lora_matmul-gpt2 75 bin/bench-lora_matmul lora_matmul/gpt2 "${crit[@]}"
        [[ -x bin/bench-attention ]] && step bench-attention 45 bin/bench-attention attention/cuda "${crit[@]}"
        [[ -x bin/bench-lora_reduce ]] && step bench-lora_reduce 45 bin/bench-lora_reduce lora_reduce/cuda "${crit[@]}"
        [[ -x bin/bench-membound ]] && step bench-membound 60 bin/bench-membound membound "${crit[@]}"
        [[ -x bin/bench-adamw ]] && step bench-adamw 45 bin/bench-adamw adamw/cuda "${crit[@]}"
        [[ -x bin/bench-merge ]] && step bench-merge 45 bin/bench-merge merge/cuda "${crit[@]}"
        if timeout 60 python3 -c "import torch, peft" > /dev/null 2>&1; then
            step side-by-side 90 python3 lora_kernels_gpu.py --criterion "$CRITERION_HOME"
            step side-by-side-train 90 python3 train_step_gpu.py --criterion "$CRITERION_HOME" \
                --ours-log logs/bench-train_step.log
            step side-by-side-kernels 90 python3 step_kernels_gpu.py --criterion "$CRITERION_HOME"
        else
            row side-by-side FAIL 0 "python3 with torch and peft not found"
        fi
    fi

    local total=$(( $(date +%s) - t0 ))
    echo
    printf '%-30s %-11s %6s  %s\n' step result time summary
    printf '%s\n' "${rows[@]}"
    printf '%-30s %-11s %5ss  %s\n' total "$( ((failed)) && echo FAIL || echo ok)" "$total" \
        "budget ${budget}s ($( ((quick)) && echo run --quick || echo run)); logs in $here/logs"
    for f in logs/side-by-side.log logs/side-by-side-train.log logs/side-by-side-kernels.log; do
        if [[ -f "$f" ]]; then
            echo
            grep -v '^RESULT ' "$f"
        fi
    done
    exit $failed
}

# A sanitizer that cannot run here: `unavailable`, or FAIL under LORAFUSE_REQUIRE_SANITIZER=1.
sanitizer_unavailable() {
    if [[ "${LORAFUSE_REQUIRE_SANITIZER:-}" == 1 ]]; then
        row sanitizer FAIL 0 "LORAFUSE_REQUIRE_SANITIZER=1 but: $1"
    else
        row sanitizer unavailable 0 "$1"
    fi
}

# sass CUOBJDUMP CUBIN...: each cubin's SASS must contain HGMMA (wgmma); one that shows only
# HMMA (mma.sync) or neither fails. Prints the counts, the last line as a `test result:`.
sass() {
    local objdump="$1" f hg hm bad=0 all=""
    shift
    for f in "$@"; do
        "$objdump" --dump-sass "$f" > "logs/sass-$(basename "$f").txt" 2>&1 || { echo "cuobjdump failed on $f"; bad=1; continue; }
        hg=$(grep -c 'HGMMA' "logs/sass-$(basename "$f").txt")
        hm=$(grep -cE '\bHMMA' "logs/sass-$(basename "$f").txt")
        echo "$(basename "$f"): $hg HGMMA, $hm HMMA"
        all="$all $(basename "$f" .sm_90a.cubin) $hg HGMMA/$hm HMMA;"
        (( hg == 0 )) && bad=1
    done
    echo "test result: $( ((bad)) && echo FAILED || echo ok).$all"
    return $bad
}

case "$cmd" in
    bundle) shift; bundle "$@" ;;
    run) shift; run "$@" ;;
    sass) shift; sass "$@" ;;
    *) echo "usage: $0 bundle [DIR] | run [--quick] | sass CUOBJDUMP CUBIN..." >&2; exit 2 ;;
esac
