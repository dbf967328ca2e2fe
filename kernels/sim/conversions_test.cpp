// conversions_test.cpp — checks lf_sim.h's bf16/f16 conversions (run by selftest.sh) against
// a reference written independently: decoding by exact double arithmetic, encoding by
// searching the sorted table of every finite 16-bit value and comparing distances in double.
//   * 16-bit → f32: all 2^16 patterns of each format (NaN patterns must decode to NaN);
//   * f32 → 16-bit, nearest-even and toward-zero: every 16-bit value, each midpoint between
//     neighbours and the f32 values one ulp either side of both, in both signs, f32's
//     specials, and a few million random f32 bit patterns. A NaN must stay a NaN.
// Prints one PASS/FAIL line per check; exits 1 if any failed.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "lf_sim.h"

namespace {

struct Format {
    const char* name;
    int man_bits;  // 7 for bf16, 10 for f16
    int exp_bits;  // 8, 5
    uint16_t inf;  // the +inf pattern, one past the largest finite value
    float (*decode)(uint16_t);
    uint16_t (*rn)(float);
    uint16_t (*rz)(float);
};

// The value of a 16-bit pattern, from the IEEE 754 definition (NaN for NaN patterns).
double reference_value(const Format& f, uint16_t bits) {
    int bias = (1 << (f.exp_bits - 1)) - 1;
    int exp = (bits >> f.man_bits) & ((1 << f.exp_bits) - 1);
    int man = bits & ((1 << f.man_bits) - 1);
    double sign = bits & 0x8000 ? -1.0 : 1.0;
    if (exp == (1 << f.exp_bits) - 1) return man == 0 ? sign * INFINITY : NAN;
    if (exp == 0) return sign * std::ldexp(double(man), 1 - bias - f.man_bits);
    return sign * std::ldexp(double(man + (1 << f.man_bits)), exp - bias - f.man_bits);
}

// table[c] = value of the non-negative pattern c, for c in [0, inf]; table[inf] is the value
// the next pattern would have with an unbounded exponent (2^128, 2^16), so that rounding
// to nearest even sends what lies past the largest finite value's half-ulp to infinity.
std::vector<double> value_table(const Format& f) {
    std::vector<double> t(f.inf + 1);
    for (uint32_t c = 0; c < f.inf; ++c) t[c] = reference_value(f, uint16_t(c));
    t[f.inf] = 2.0 * t[f.inf - (1u << f.man_bits)];  // the value of inf's exponent with mantissa 0
    return t;
}

uint16_t reference_encode(const Format& f, const std::vector<double>& t, float x, bool nearest_even) {
    uint16_t sign = std::signbit(x) ? 0x8000 : 0;
    double a = std::fabs(double(x));
    if (std::isinf(a)) return sign | f.inf;
    // c: the largest pattern whose value is <= a.
    size_t c = size_t(std::upper_bound(t.begin(), t.end(), a) - t.begin()) - 1;
    if (c == f.inf) return sign | (nearest_even ? f.inf : uint16_t(f.inf - 1));
    if (t[c] == a || !nearest_even) return uint16_t(sign | c);
    double below = a - t[c], above = t[c + 1] - a;
    size_t r = below < above ? c : above < below ? c + 1 : (c % 2 == 0 ? c : c + 1);
    return uint16_t(sign | r);
}

int g_failures = 0;

void report(const char* what, const Format& f, uint64_t checked, uint64_t bad, const char* first) {
    if (bad == 0) {
        std::printf("PASS %s %s (%llu values)\n", f.name, what, (unsigned long long)checked);
    } else {
        std::printf("FAIL %s %s: %llu of %llu wrong, first: %s\n", f.name, what, (unsigned long long)bad,
                    (unsigned long long)checked, first);
        ++g_failures;
    }
}

void check_decode(const Format& f) {
    uint64_t bad = 0;
    char first[128] = "";
    for (uint32_t b = 0; b < 0x10000; ++b) {
        double want = reference_value(f, uint16_t(b));
        float got = f.decode(uint16_t(b));
        bool ok = std::isnan(want) ? std::isnan(got)
                                   : double(got) == want && std::signbit(got) == std::signbit(want);
        if (!ok && bad++ == 0) std::snprintf(first, sizeof first, "0x%04x -> %a, expected %a", b, got, want);
    }
    report("16-bit -> f32, all 2^16 patterns", f, 0x10000, bad, first);
}

std::vector<float> encode_inputs(const Format& f, const std::vector<double>& t) {
    std::vector<float> v;
    auto add_around = [&](float x) {
        for (float y : {x, std::nextafter(x, 0.0f), std::nextafter(x, INFINITY)}) {
            v.push_back(y);
            v.push_back(-y);
        }
    };
    for (uint32_t c = 0; c < f.inf; ++c) {
        add_around(float(t[c]));
        add_around(
            float((t[c] + t[c + 1]) / 2));  // exact: a midpoint needs one bit more than 16-bit values have
    }
    const float specials[] = {0.0f,
                              INFINITY,
                              std::numeric_limits<float>::max(),
                              std::numeric_limits<float>::min(),
                              std::numeric_limits<float>::denorm_min(),
                              0x1p-126f * 0.5f,
                              65504.0f,
                              65519.996f,
                              65520.0f,
                              65536.0f,
                              0x1p-24f,
                              0x1p-25f,
                              0x1p-14f};
    for (float s : specials) add_around(s);
    std::mt19937 rng(20240611);
    for (int i = 0; i < 4'000'000; ++i) {
        float x = std::bit_cast<float>(uint32_t(rng()));
        if (!std::isnan(x)) v.push_back(x);
    }
    return v;
}

void check_encode(const Format& f) {
    std::vector<double> t = value_table(f);
    std::vector<float> inputs = encode_inputs(f, t);
    for (bool nearest_even : {true, false}) {
        uint64_t bad = 0;
        char first[128] = "";
        for (float x : inputs) {
            uint16_t want = reference_encode(f, t, x, nearest_even);
            uint16_t got = nearest_even ? f.rn(x) : f.rz(x);
            if (got != want && bad++ == 0) {
                std::snprintf(first, sizeof first, "%a (0x%08x) -> 0x%04x, expected 0x%04x", x,
                              std::bit_cast<uint32_t>(x), got, want);
            }
        }
        report(nearest_even ? "f32 -> 16-bit, nearest even" : "f32 -> 16-bit, toward zero", f, inputs.size(),
               bad, first);
    }
    // NaNs of every payload class stay NaN, through both roundings and back.
    uint64_t bad = 0;
    const uint32_t nans[] = {0x7fc00000u, 0x7f800001u, 0x7fbfffffu, 0xffc00000u, 0xff800001u, 0x7f802000u};
    for (uint32_t n : nans) {
        float x = std::bit_cast<float>(n);
        bad += !std::isnan(f.decode(f.rn(x))) + !std::isnan(f.decode(f.rz(x)));
    }
    report("NaN stays NaN", f, 2 * std::size(nans), bad, "a NaN became a number");
}

}  // namespace

int main() {
    const Format bf16{"bf16",
                      7,
                      8,
                      0x7f80,
                      [](uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); },
                      [](float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); },
                      [](float x) { return __bfloat16_as_ushort(__float2bfloat16_rz(x)); }};
    const Format f16{"f16",
                     10,
                     5,
                     0x7c00,
                     [](uint16_t b) { return __half2float(__ushort_as_half(b)); },
                     [](float x) { return __half_as_ushort(__float2half_rn(x)); },
                     [](float x) { return __half_as_ushort(__float2half_rz(x)); }};
    for (const Format* f : {&bf16, &f16}) {
        check_decode(*f);
        check_encode(*f);
    }
    // The other spellings CUDA has for the same conversions.
    bool same = __bfloat16_as_ushort(__float2bfloat16(1.00390625f)) == 0x3f80 &&
                __half_as_ushort(__float2half(1.00390625f)) == 0x3c04 &&
                __bfloat16_as_ushort(__nv_bfloat16(3.0f)) == 0x4040 && float(__half(0.5f)) == 0.5f;
    std::printf("%s aliases __float2bfloat16, __float2half and the converting constructors\n",
                same ? "PASS" : "FAIL");
    g_failures += !same;
    return g_failures == 0 ? 0 : 1;
}
