// Pure C++ unit test of packing.h (no Python): run by ctest from the top-level CMakeLists.txt.
// The fast algorithms are checked against a brute-force transcription of the specification in packing.h
// (O(N·B) scans over all bins) on random inputs, plus invariants, a hand-worked example and the error paths.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "packing.h"

using namespace mllm_packing;

static int g_failures = 0;
#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                        \
    }                                                                      \
  } while (0)

// The specification, literally: stable sort, then a linear scan of all open bins per item.
static PackOutput brute_force(const std::vector<int64_t>& lengths, int64_t L, Algorithm algo, Overflow ovf,
                              std::optional<uint64_t> seed) {
  struct It { int64_t doc, start, len; };
  std::vector<It> items;
  int64_t dropped = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int64_t n = lengths[i];
    if (ovf == Overflow::Split) {
      for (int64_t s = 0; s < n; s += L) items.push_back({int64_t(i), s, std::min(L, n - s)});
    } else {
      items.push_back({int64_t(i), 0, std::min(n, L)});
      dropped += std::max<int64_t>(n - L, 0);
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const It& a, const It& b) { return a.len > b.len; });
  std::vector<int64_t> cap, bin(items.size()), off(items.size());
  for (size_t k = 0; k < items.size(); ++k) {
    int64_t best = -1;
    for (size_t b = 0; b < cap.size(); ++b) {
      if (cap[b] < items[k].len) continue;
      if (best < 0 || (algo == Algorithm::BFD && cap[b] < cap[size_t(best)])) best = int64_t(b);
      if (algo == Algorithm::FFD) break;
    }
    if (best < 0) {
      best = int64_t(cap.size());
      cap.push_back(L);
    }
    bin[k] = best;
    off[k] = L - cap[size_t(best)];
    cap[size_t(best)] -= items[k].len;
  }
  const int64_t B = int64_t(cap.size());
  std::vector<int64_t> row_bin(static_cast<size_t>(B)), row_of_bin(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) row_bin[size_t(b)] = b;
  if (seed) {
    SplitMix64 rng(*seed);
    for (int64_t i = B - 1; i >= 1; --i) std::swap(row_bin[size_t(i)], row_bin[size_t(rng.next() % uint64_t(i + 1))]);
  }
  for (int64_t r = 0; r < B; ++r) row_of_bin[size_t(row_bin[size_t(r)])] = r;
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> seg;  // row, offset, doc, start, len
  for (size_t k = 0; k < items.size(); ++k)
    seg.emplace_back(row_of_bin[size_t(bin[k])], off[k], items[k].doc, items[k].start, items[k].len);
  std::sort(seg.begin(), seg.end());
  PackOutput out;
  out.n_rows = B;
  out.n_dropped = dropped;
  out.row_ptr.assign(size_t(B) + 1, 0);
  for (auto& [r, o, d, s, l] : seg) {
    out.row.push_back(r);
    out.offset.push_back(o);
    out.doc.push_back(d);
    out.start.push_back(s);
    out.length.push_back(l);
    out.row_ptr[size_t(r) + 1] += 1;
    out.n_tokens += l;
  }
  for (int64_t r = 0; r < B; ++r) out.row_ptr[size_t(r) + 1] += out.row_ptr[size_t(r)];
  return out;
}

static bool eq(const Vec<int64_t>& a, const std::vector<int64_t>& b) {
  return std::vector<int64_t>(a.begin(), a.end()) == b;
}

static bool same(const PackOutput& a, const PackOutput& b) {
  return a.doc == b.doc && a.start == b.start && a.length == b.length && a.row == b.row && a.offset == b.offset &&
         a.row_ptr == b.row_ptr && a.n_rows == b.n_rows && a.n_tokens == b.n_tokens && a.n_dropped == b.n_dropped;
}

// Every token of every document placed exactly once (split) / its first min(n, L) tokens (truncate); no row
// over capacity; segments of a row contiguous from offset 0 and in (row, offset) order.
static void check_invariants(const std::vector<int64_t>& lengths, int64_t L, Overflow ovf, const PackOutput& p) {
  std::map<int64_t, int64_t> next_start;  // per document: tokens covered so far, chunks in start order
  std::vector<std::vector<std::pair<int64_t, int64_t>>> per_doc(lengths.size());
  for (size_t k = 0; k < p.doc.size(); ++k) per_doc[size_t(p.doc[k])].push_back({p.start[k], p.length[k]});
  for (size_t i = 0; i < lengths.size(); ++i) {
    auto& v = per_doc[i];
    std::sort(v.begin(), v.end());
    int64_t covered = 0;
    for (auto& [s, l] : v) {
      CHECK(s == covered);
      CHECK(l >= 1 && l <= L);
      covered += l;
    }
    CHECK(covered == (ovf == Overflow::Split ? lengths[i] : std::min(lengths[i], L)));
  }
  for (int64_t r = 0; r < p.n_rows; ++r) {
    int64_t fill = 0;
    CHECK(p.row_ptr[size_t(r) + 1] > p.row_ptr[size_t(r)]);  // no empty row
    for (int64_t k = p.row_ptr[size_t(r)]; k < p.row_ptr[size_t(r) + 1]; ++k) {
      CHECK(p.row[size_t(k)] == r);
      CHECK(p.offset[size_t(k)] == fill);
      fill += p.length[size_t(k)];
    }
    CHECK(fill <= L);
  }
}

static void test_next_set_bit() {
  std::mt19937_64 rng(7);
  for (size_t n : {1, 2, 63, 64, 65, 1000, 4097, 300000}) {
    NextSetBit s(n);
    std::set<size_t> ref;
    for (int step = 0; step < 3000; ++step) {
      const size_t i = rng() % n;
      if (rng() % 3) { s.insert(i); ref.insert(i); } else { s.erase(i); ref.erase(i); }
      const size_t q = rng() % n;
      auto it = ref.lower_bound(q);
      CHECK(s.next(q) == (it == ref.end() ? NextSetBit::npos : *it));
    }
  }
}

static void test_example() {
  // L = 8, lengths 5 3 8 2 7 1 -> sorted 8 7 5 3 2 1: 8 -> b0 (full), 7 -> b1 (cap 1), 5 -> b2 (cap 3),
  // 3 -> b2 (the best fit, now full), 2 -> b3 (nothing else fits), 1 -> b1 (cap 1, the best fit).
  const std::vector<int64_t> lens{5, 3, 8, 2, 7, 1};
  PackOutput p = pack(lens.data(), lens.size(), 8, Algorithm::BFD, Overflow::Split, std::nullopt);
  CHECK(p.n_rows == 4);
  CHECK(eq(p.doc, {2, 4, 5, 0, 1, 3}));
  CHECK(eq(p.offset, {0, 0, 7, 0, 5, 0}));
  CHECK(eq(p.row_ptr, {0, 1, 3, 5, 6}));
  CHECK(p.n_tokens == 26);
}

static void test_bfd_ffd_differ() {
  // A minimal case where they differ (4 items): L = 7, lengths 5 3 3 1: 5 -> b0 (cap 2), 3 -> b1 (cap 4),
  // 3 -> b1 (cap 1); the 1 goes to b0 under FFD (the first bin with room) and to b1 under BFD (the tightest).
  const std::vector<int64_t> lens{5, 3, 3, 1};
  PackOutput bfd = pack(lens.data(), lens.size(), 7, Algorithm::BFD, Overflow::Split, std::nullopt);
  PackOutput ffd = pack(lens.data(), lens.size(), 7, Algorithm::FFD, Overflow::Split, std::nullopt);
  CHECK(eq(bfd.doc, {0, 1, 2, 3}));
  CHECK(eq(bfd.row, {0, 1, 1, 1}));
  CHECK(eq(bfd.offset, {0, 0, 3, 6}));
  CHECK(eq(ffd.doc, {0, 3, 1, 2}));
  CHECK(eq(ffd.row, {0, 0, 1, 1}));
  CHECK(eq(ffd.offset, {0, 5, 0, 3}));
}

static void test_random_against_brute_force() {
  std::mt19937_64 rng(1234);
  for (int t = 0; t < 3000; ++t) {
    const int64_t L = 1 + int64_t(rng() % 64);
    std::vector<int64_t> lens(rng() % 80);
    const int kind = int(rng() % 4);  // lengths: mixed, all <= L, all equal, many ones
    const int64_t same_len = 1 + int64_t(rng() % uint64_t(3 * L));
    for (auto& x : lens) {
      if (kind == 0) x = 1 + int64_t(rng() % uint64_t(3 * L + 1));
      else if (kind == 1) x = 1 + int64_t(rng() % uint64_t(L));
      else if (kind == 2) x = same_len;
      else x = (rng() % 5) ? 1 : 1 + int64_t(rng() % uint64_t(2 * L));
    }
    for (Algorithm algo : {Algorithm::BFD, Algorithm::FFD})
      for (Overflow ovf : {Overflow::Split, Overflow::Truncate})
        for (std::optional<uint64_t> seed : {std::optional<uint64_t>(), std::optional<uint64_t>(rng())}) {
          PackOutput fast = pack(lens.data(), lens.size(), L, algo, ovf, seed);
          PackOutput ref = brute_force(lens, L, algo, ovf, seed);
          CHECK(same(fast, ref));
          check_invariants(lens, L, ovf, fast);
        }
  }
}

template <class F>
static void expect_invalid(F f, const char* what) {
  try {
    f();
    std::fprintf(stderr, "expected std::invalid_argument: %s\n", what);
    ++g_failures;
  } catch (const std::invalid_argument&) {
  }
}

static void test_errors() {
  const std::vector<int64_t> zero{3, 0, 2}, neg{-1}, ok{1, 2};
  expect_invalid([&] { pack(zero.data(), zero.size(), 4, Algorithm::BFD, Overflow::Split, std::nullopt); }, "zero");
  expect_invalid([&] { pack(neg.data(), neg.size(), 4, Algorithm::FFD, Overflow::Split, std::nullopt); }, "negative");
  expect_invalid([&] { pack(ok.data(), ok.size(), 0, Algorithm::BFD, Overflow::Split, std::nullopt); }, "row_len 0");
  expect_invalid([&] { pack(ok.data(), ok.size(), -5, Algorithm::BFD, Overflow::Split, std::nullopt); }, "row_len < 0");
  expect_invalid([&] { pack(ok.data(), ok.size(), kMaxRowLen + 1, Algorithm::BFD, Overflow::Split, std::nullopt); },
                 "row_len too large");
  expect_invalid([] { parse_algorithm("nfd"); }, "algorithm");
  expect_invalid([] { parse_overflow("wrap"); }, "overflow");
}

static void test_splitmix64() {
  SplitMix64 r(0);  // reference value of splitmix64 seeded with 0 (Vigna's splitmix64.c)
  CHECK(r.next() == 0xE220A8397B1DCDAFULL);
}

static void test_empty_and_large() {
  PackOutput e = pack(nullptr, 0, 16, Algorithm::BFD, Overflow::Split, uint64_t(3));
  CHECK(e.n_rows == 0 && e.doc.empty() && e.row_ptr.size() == 1);
  // 200k documents, lengths 1..1024: efficiency of BFD must be high on such a smooth distribution.
  std::mt19937_64 rng(5);
  std::vector<int64_t> lens(200000);
  for (auto& x : lens) x = 1 + int64_t(rng() % 1024);
  for (Algorithm algo : {Algorithm::BFD, Algorithm::FFD}) {
    PackOutput p = pack(lens.data(), lens.size(), 1024, algo, Overflow::Split, uint64_t(0));
    const double eff = double(p.n_tokens) / double(p.n_rows * 1024);
    CHECK(eff > 0.99);
    check_invariants(lens, 1024, Overflow::Split, p);
  }
}

int main() {
  test_next_set_bit();
  test_example();
  test_bfd_ffd_differ();
  test_random_against_brute_force();
  test_errors();
  test_splitmix64();
  test_empty_and_large();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("test_packing: all checks passed\n");
  return 0;
}
