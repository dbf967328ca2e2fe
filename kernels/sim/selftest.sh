#!/usr/bin/env bash
# selftest.sh — builds the simulator three ways (plain, AddressSanitizer, ThreadSanitizer)
# into a temporary folder and checks it: the self-test kernels and error paths
# (selftest_main.cpp, in all three builds, so the sanitizers also watch the runtime), the
# bf16/f16 conversions (conversions_test.cpp), and the planted-bug scenarios of
# victim_main.cpp under the sanitizer that must catch each. Prints PASS/FAIL per check and
# exits 1 if any failed. About a minute on 2 cores. Usage: kernels/sim/selftest.sh [CXX]
#
# The flags build.rs should use (g++ 12; none beyond these was needed):
#   every build:  -std=c++20 -DLORAFUSE_SIM -pthread -I kernels -I kernels/sim
#                 (-pthread at link time as well; no -latomic needed)
#   plain:        -O2                       (-fPIC, as the cc crate adds, works too)
#   ASan:         -g -O1 -fno-omit-frame-pointer -fsanitize=address   (compile and link)
#   TSan:         -g -O1 -fno-omit-frame-pointer -fsanitize=thread    (compile and link;
#                 no -fPIE/-pie needed: Debian's g++ builds PIE by default)
# All sources compile warning-free with -Wall -Wextra, which this script checks.
set -u
here=$(cd "$(dirname "$0")" && pwd)
kernels=$(dirname "$here")
cxx=${1:-g++}
out=$(mktemp -d /tmp/lf_sim_selftest.XXXXXX)
trap 'rm -rf "$out"' EXIT

common=(-std=c++20 -DLORAFUSE_SIM -pthread -I "$kernels" -I "$here" -Wall -Wextra)
declare -A flags=(
    [plain]="-O2"
    [asan]="-g -O1 -fno-omit-frame-pointer -fsanitize=address"
    [tsan]="-g -O1 -fno-omit-frame-pointer -fsanitize=thread"
)
units=(runtime.cpp example_generated/planted_bugs.sim.cpp example_generated/registry.cpp
       selftest_main.cpp victim_main.cpp conversions_test.cpp)

failures=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }

# ---- Build: every (flavour, unit) object, two compilers at a time ----
echo "building in $out ..."
jobs_running=0
for flavour in plain asan tsan; do
    for unit in "${units[@]}"; do
        [[ $unit == conversions_test.cpp && $flavour != plain ]] && continue
        obj="$out/$flavour.$(basename "$unit" .cpp).o"
        # shellcheck disable=SC2086
        "$cxx" "${common[@]}" ${flags[$flavour]} -c "$here/$unit" -o "$obj" 2>"$obj.log" &
        jobs_running=$((jobs_running + 1))
        if ((jobs_running == 2)); then wait -n; jobs_running=$((jobs_running - 1)); fi
    done
done
wait
link() {  # link FLAVOUR NAME UNIT... (units by basename)
    local flavour=$1 name=$2; shift 2
    local objs=()
    for u in "$@"; do objs+=("$out/$flavour.$u.o"); done
    # shellcheck disable=SC2086
    "$cxx" -pthread ${flags[$flavour]} "${objs[@]}" -o "$out/$name" 2>>"$out/link.log"
}
lib=(runtime planted_bugs.sim registry)
link plain selftest_plain "${lib[@]}" selftest_main
link plain conversions_test conversions_test
for s in asan tsan; do
    link "$s" "selftest_$s" "${lib[@]}" selftest_main
    link "$s" "victim_$s" "${lib[@]}" victim_main
done
missing=""
for b in selftest_plain conversions_test selftest_asan selftest_tsan victim_asan victim_tsan; do
    [[ -x $out/$b ]] || missing+="$b "
done
if [[ -z $missing ]]; then
    pass "build: plain, ASan and TSan"
else
    fail "build: missing $missing"
    cat "$out"/*.log
    exit 1
fi
if cat "$out"/*.log | grep -q "warning"; then
    fail "no compiler warnings (-Wall -Wextra)"
    cat "$out"/*.log
else
    pass "no compiler warnings (-Wall -Wextra)"
fi

# ---- The conversions and the self-tests ----
run_checks() {  # NAME BINARY: passes the binary's PASS/FAIL lines through, prefixed
    local name=$1 bin=$2
    "$bin" >"$out/$name.out" 2>"$out/$name.err"
    local rc=$?
    while IFS= read -r line; do
        case $line in
            PASS*) echo "PASS [$name] ${line#PASS }" ;;
            FAIL*) fail "[$name] ${line#FAIL }" ;;
            INFO*) echo "INFO [$name] ${line#INFO }" ;;
        esac
    done <"$out/$name.out"
    if ((rc != 0)) || grep -q "Sanitizer" "$out/$name.err"; then
        fail "[$name] exit status $rc, sanitizer report or stderr:"
        head -40 "$out/$name.err"
    else
        pass "[$name] exit status 0, no sanitizer report"
    fi
}
run_checks conversions "$out/conversions_test"
run_checks plain "$out/selftest_plain"
run_checks asan "$out/selftest_asan"
run_checks tsan "$out/selftest_tsan"

# ---- Planted bugs: each caught by its sanitizer; each control silent under both ----
scenario() {  # SANITIZER SCENARIO EXPECTED ("" = clean control)
    local san=$1 name=$2 expected=$3
    "$out/victim_$san" "$name" >"$out/v.out" 2>"$out/v.err"
    local rc=$?
    if [[ -n $expected ]]; then
        if ((rc != 0)) && grep -q "$expected" "$out/v.err"; then
            pass "[victim $san] $name: reported '$expected'"
        else
            fail "[victim $san] $name: no '$expected' report (exit status $rc)"
            head -20 "$out/v.err"
        fi
    elif ((rc == 0)) && grep -qx ok "$out/v.out" && ! grep -q "Sanitizer" "$out/v.err"; then
        pass "[victim $san] $name: clean"
    else
        fail "[victim $san] $name: exit status $rc"
        head -40 "$out/v.err"
    fi
}
scenario asan oob_write "ERROR: AddressSanitizer: heap-buffer-overflow"
scenario asan shared_oob "ERROR: AddressSanitizer: global-buffer-overflow"
scenario asan dynamic_smem_oob "ERROR: AddressSanitizer: heap-buffer-overflow"
for i in 1 2 3; do
    scenario tsan missing_barrier "WARNING: ThreadSanitizer: data race"
done
for san in asan tsan; do
    for control in oob_write_control smem_oob_control missing_barrier_control; do
        scenario "$san" "$control" ""
    done
done

if ((failures == 0)); then
    echo "selftest: all checks passed"
else
    echo "selftest: $failures check(s) FAILED"
    exit 1
fi
