// Sequence packing: place documents (token-length lists) into fixed-length rows with little padding.
//
// Pure C++17, no Python and no torch, so that the unit test (csrc/test_packing.cpp) links without an
// interpreter. csrc/packing.cpp wraps it for Python as mllm._C; mllm/data/packing.py holds a pure-Python
// reference that must give IDENTICAL results (tests/test_packing.py checks it).
//
// The specification, step by step (both implementations follow it literally):
//  1. Items. Document i of length n_i becomes chunks. overflow=Split: floor(n_i/L) full chunks of L tokens
//     then one chunk of n_i mod L tokens if that is > 0, at starts 0, L, 2L, ...; overflow=Truncate: one
//     chunk (0, min(n_i, L)), the remaining n_i - L tokens are dropped (counted in n_dropped).
//     Items are generated in document order, chunks of a document in start order.
//  2. Order. Items are sorted by length, longest first; ties keep generation order (a stable sort).
//  3. Placement, one item at a time in that order, into bins numbered 0, 1, ... in order of opening:
//       BFD: the open bin with the SMALLEST remaining capacity >= len (ties: the lowest bin number);
//       FFD: the LOWEST-numbered open bin with remaining capacity >= len;
//     if no open bin fits, a new bin is opened. The item's offset in its bin is the bin's fill before it.
//  4. Rows. seed absent: row r = bin r. Seed s: rows are a Fisher-Yates shuffle of the bins driven by
//     splitmix64(s): row_bin = [0..B-1]; for i = B-1 down to 1: j = next() % (i+1); swap(row_bin[i],
//     row_bin[j]); row r holds bin row_bin[r].
//  5. Output. Segments (doc, start, length, row, offset) sorted by (row, offset); row_ptr[r]..row_ptr[r+1]
//     are the segments of row r (CSR); n_tokens = sum of lengths placed; efficiency = n_tokens / (R * L).
//
// Cost: items are counting-sorted by length (O(N + L)). BFD finds "smallest capacity >= len" in a 64-ary
// bitset tree over capacity values 0..L (O(log_64 L)), and the lowest bin with that capacity in a min-heap
// per capacity value (O(log B)). FFD finds "first bin with room" by descending a max segment tree over bins
// (O(log B)). So O(N log B + L) overall for N items and B bins.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <new>
#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace mllm_packing {

// std::allocator that default-initialises: resize() leaves ints uninitialised instead of zeroing them,
// since every element is written before it is read (saves a memset pass over ~90 MB at 1M documents).
// On Linux, buffers of 4 MiB or more are 2 MiB-aligned and advised to use transparent huge pages: fresh
// memory is otherwise faulted in 4 KiB at a time, which was ~25% of the time of a 1M-document pack.
template <class T>
struct DefaultInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  DefaultInitAllocator() = default;
  template <class U>
  DefaultInitAllocator(const DefaultInitAllocator<U>&) noexcept {}

  static constexpr size_t kHuge = size_t(2) << 20;
  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
#ifdef __linux__
    if (bytes >= 2 * kHuge) {
      const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
      void* p = std::aligned_alloc(kHuge, rounded);
      if (!p) throw std::bad_alloc();
      madvise(p, rounded, MADV_HUGEPAGE);  // a hint: without THP it is a no-op
      return static_cast<T*>(p);
    }
#endif
    void* p = std::malloc(std::max<size_t>(bytes, 1));
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { std::free(p); }
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <class T>
using Vec = std::vector<T, DefaultInitAllocator<T>>;

enum class Algorithm { BFD, FFD };
enum class Overflow { Split, Truncate };

// The largest row length accepted: BFD keeps one heap per capacity value 0..L, so L bounds memory.
constexpr int64_t kMaxRowLen = int64_t(1) << 20;

struct PackOutput {
  Vec<int64_t> doc, start, length, row, offset;  // one entry per placed segment, (row, offset) order
  Vec<int64_t> row_ptr;                          // [n_rows + 1]
  int64_t n_rows = 0;
  int64_t n_tokens = 0;   // tokens placed
  int64_t n_dropped = 0;  // tokens dropped by Overflow::Truncate
};

inline Algorithm parse_algorithm(const std::string& s) {
  if (s == "bfd") return Algorithm::BFD;
  if (s == "ffd") return Algorithm::FFD;
  throw std::invalid_argument("algorithm must be 'bfd' or 'ffd', got '" + s + "'");
}

inline Overflow parse_overflow(const std::string& s) {
  if (s == "split") return Overflow::Split;
  if (s == "truncate") return Overflow::Truncate;
  throw std::invalid_argument("overflow must be 'split' or 'truncate', got '" + s + "'");
}

// splitmix64 (Steele, Lea, Flood 2014): tiny, and trivially reproducible in Python with 64-bit masking.
struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
};

// A set of integers in [0, n) answering "smallest member >= i" with one 64-bit word per level:
// a segment tree of fan-out 64, so a query touches at most ceil(log_64 n) words up and as many down.
class NextSetBit {
 public:
  static constexpr size_t npos = ~size_t(0);

  explicit NextSetBit(size_t n) {
    size_t m = std::max<size_t>(n, 1);
    do {
      m = (m + 63) / 64;
      levels_.emplace_back(m, 0);
    } while (m > 1);
  }

  void insert(size_t i) {
    for (auto& lv : levels_) {
      const size_t w = i >> 6;
      const bool was_empty = lv[w] == 0;
      lv[w] |= uint64_t(1) << (i & 63);
      if (!was_empty) return;  // the levels above already record this word as non-empty
      i = w;
    }
  }

  void erase(size_t i) {
    for (auto& lv : levels_) {
      const size_t w = i >> 6;
      lv[w] &= ~(uint64_t(1) << (i & 63));
      if (lv[w] != 0) return;  // the word still has members: the levels above stay as they are
      i = w;
    }
  }

  size_t next(size_t i) const {
    for (size_t lvl = 0; lvl < levels_.size(); ++lvl) {
      const size_t w = i >> 6;
      if (w >= levels_[lvl].size()) return npos;
      const uint64_t bits = levels_[lvl][w] & (~uint64_t(0) << (i & 63));
      if (bits) {
        size_t idx = (w << 6) | size_t(__builtin_ctzll(bits));
        while (lvl > 0) {  // descend to the leftmost member below the word found
          --lvl;
          idx = (idx << 6) | size_t(__builtin_ctzll(levels_[lvl][idx]));
        }
        return idx;
      }
      i = w + 1;  // nothing at or after i in this word: look from the next word, one level up
    }
    return npos;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

// Steps 1-2: items sorted longest first, stable. Counting sort, since lengths are at most L.
struct Items {
  Vec<int32_t> doc, chunk, len;  // chunk c starts at token c * L of its document
  int64_t n_dropped = 0;
};

inline Items make_sorted_items(const int64_t* lengths, size_t n, int64_t L, Overflow overflow) {
  std::vector<int64_t> count(size_t(L) + 2, 0);
  size_t n_items = 0;
  int64_t n_dropped = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t x = lengths[i];
    if (x <= 0)
      throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(x) +
                                  ": every document length must be >= 1");
    // doc and chunk indices are int32: fewer than 2**31 items, hence documents and chunks per document. Checked
    // before each addition, so that neither n_items nor count[] can wrap (a wrapped n_items sized the arrays
    // below too small)
    const int64_t pieces = (x <= L || overflow != Overflow::Split) ? 1 : x / L + (x % L ? 1 : 0);
    if (pieces > int64_t(INT32_MAX) - int64_t(n_items))
      throw std::invalid_argument("too many pieces to pack: more than 2**31 - 1 (at lengths[" + std::to_string(i) +
                                  "] = " + std::to_string(x) + ", row_len " + std::to_string(L) + ")");
    if (x <= L) {  // the common case, without a division
      count[size_t(x)] += 1;
    } else if (overflow == Overflow::Split) {
      count[size_t(L)] += x / L;
      if (x % L) count[size_t(x % L)] += 1;
    } else {
      count[size_t(L)] += 1;
      if (x - L > INT64_MAX - n_dropped)
        throw std::invalid_argument("tokens dropped by truncation overflow int64 (at lengths[" + std::to_string(i) +
                                    "] = " + std::to_string(x) + ")");
      n_dropped += x - L;
    }
    n_items += size_t(pieces);
  }
  // position of the first item of each length in the sorted (descending) order
  std::vector<int64_t> pos(size_t(L) + 2, 0);
  int64_t acc = 0;
  for (int64_t l = L; l >= 1; --l) {
    pos[size_t(l)] = acc;
    acc += count[size_t(l)];
  }
  Items it;
  it.doc.resize(n_items);
  it.chunk.resize(n_items);
  it.len.resize(n_items);
  it.n_dropped = n_dropped;
  auto put = [&](int64_t d, int64_t c, int64_t l) {
    const int64_t p = pos[size_t(l)]++;
    it.doc[size_t(p)] = int32_t(d);
    it.chunk[size_t(p)] = int32_t(c);
    it.len[size_t(p)] = int32_t(l);
  };
  for (size_t i = 0; i < n; ++i) {
    const int64_t x = lengths[i];
    if (x <= L) {
      put(int64_t(i), 0, x);
    } else if (overflow == Overflow::Split) {
      const int64_t full = x / L;
      for (int64_t k = 0; k < full; ++k) put(int64_t(i), k, L);
      if (x % L) put(int64_t(i), full, x % L);
    } else {
      put(int64_t(i), 0, std::min(x, L));
    }
  }
  return it;
}

// Step 3, BFD. Writes bin and offset per item; returns the number of bins.
inline int64_t place_bfd(const Vec<int32_t>& len, int64_t L, Vec<int32_t>& bin, Vec<int32_t>& offset) {
  NextSetBit caps(size_t(L) + 1);                 // capacity values held by at least one open bin
  std::vector<std::vector<int32_t>> by_cap(size_t(L) + 1);  // min-heap of bin numbers per capacity
  const std::greater<int32_t> min_heap;
  int64_t n_bins = 0;
  for (size_t k = 0; k < len.size(); ++k) {
    const int32_t l = len[k];
    const size_t c = caps.next(size_t(l));
    int32_t b;
    int64_t cap;
    if (c == NextSetBit::npos) {
      b = int32_t(n_bins++);
      cap = L;
    } else {
      auto& h = by_cap[c];
      std::pop_heap(h.begin(), h.end(), min_heap);
      b = h.back();
      h.pop_back();
      if (h.empty()) caps.erase(c);
      cap = int64_t(c);
    }
    bin[k] = b;
    offset[k] = int32_t(L - cap);
    const int64_t left = cap - l;
    if (left > 0) {  // a full bin can never take another item (every length is >= 1): forget it
      auto& h = by_cap[size_t(left)];
      if (h.empty()) caps.insert(size_t(left));
      h.push_back(b);
      std::push_heap(h.begin(), h.end(), min_heap);
    }
  }
  return n_bins;
}

// An upper bound on the bins any "open a bin only when nothing fits" algorithm (BFD, FFD) uses: no two
// bins end at most half full (the later one's first item would have fitted into the earlier one), so
// (B - 1) * L / 2 < tokens, i.e. B <= 2 * tokens / L + 1; and never more bins than items.
inline size_t max_bins(const Vec<int32_t>& len, int64_t L) {
  int64_t tokens = 0;
  for (int32_t l : len) tokens += l;
  return std::min(len.size(), size_t(2 * tokens / L + 1));
}

// Step 3, FFD. A max segment tree over bin numbers; bins not opened yet count as empty (capacity L), so
// the leftmost leaf with room is either an open bin or the next bin to open, and a descent always succeeds.
inline int64_t place_ffd(const Vec<int32_t>& len, int64_t L, Vec<int32_t>& bin, Vec<int32_t>& offset) {
  const size_t bins_bound = max_bins(len, L);
  size_t P = 1;
  while (P < bins_bound) P <<= 1;
  Vec<int32_t> tree(2 * P, int32_t(L));
  int64_t n_bins = 0;
  for (size_t k = 0; k < len.size(); ++k) {
    const int32_t l = len[k];
    size_t node = 1;
    while (node < P) node = tree[2 * node] >= l ? 2 * node : 2 * node + 1;
    const int32_t b = int32_t(node - P);
    bin[k] = b;
    offset[k] = int32_t(L) - tree[node];
    if (b == n_bins) ++n_bins;
    tree[node] -= l;
    for (node >>= 1; node >= 1; node >>= 1) {
      const int32_t m = std::max(tree[2 * node], tree[2 * node + 1]);
      if (tree[node] == m) break;  // the maximum above did not change
      tree[node] = m;
    }
  }
  return n_bins;
}

// Steps 1-5. Throws std::invalid_argument on bad input (the message names the problem).
inline PackOutput pack(const int64_t* lengths, size_t n, int64_t row_len, Algorithm algorithm, Overflow overflow,
                       std::optional<uint64_t> seed) {
  if (row_len <= 0 || row_len > kMaxRowLen)
    throw std::invalid_argument("row_len must be in [1, " + std::to_string(kMaxRowLen) + "], got " +
                                std::to_string(row_len));
  const int64_t L = row_len;
  Items it = make_sorted_items(lengths, n, L, overflow);
  const size_t N = it.len.size();
  Vec<int32_t> bin(N), offset(N);
  const int64_t B = algorithm == Algorithm::BFD ? place_bfd(it.len, L, bin, offset) : place_ffd(it.len, L, bin, offset);

  Vec<int32_t> row_of_bin(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) row_of_bin[size_t(b)] = int32_t(b);
  if (seed && B > 1) {
    Vec<int32_t> row_bin(row_of_bin);
    SplitMix64 rng(*seed);
    for (int64_t i = B - 1; i >= 1; --i) {
      const int64_t j = int64_t(rng.next() % uint64_t(i + 1));
      std::swap(row_bin[size_t(i)], row_bin[size_t(j)]);
    }
    for (int64_t r = 0; r < B; ++r) row_of_bin[size_t(row_bin[size_t(r)])] = int32_t(r);
  }

  // Step 5: a stable counting sort by row (within a bin, placement order is offset order). The random
  // scatter writes one 16-byte record per item; a sequential pass then expands the records into the five
  // output arrays (five random writes per item were ~2x slower).
  struct Rec {
    int32_t doc, chunk, len, offset;
  };
  PackOutput out;
  out.n_rows = B;
  out.n_dropped = it.n_dropped;
  out.row_ptr.assign(size_t(B) + 1, 0);
  for (size_t k = 0; k < N; ++k) out.row_ptr[size_t(row_of_bin[size_t(bin[k])]) + 1] += 1;
  for (int64_t r = 0; r < B; ++r) out.row_ptr[size_t(r) + 1] += out.row_ptr[size_t(r)];
  Vec<Rec> rec(N);
  {
    Vec<int32_t> next(static_cast<size_t>(B));  // int32: N < 2**31 (checked in make_sorted_items)
    for (int64_t r = 0; r < B; ++r) next[size_t(r)] = int32_t(out.row_ptr[size_t(r)]);
    for (size_t k = 0; k < N; ++k) {
      const size_t p = size_t(next[size_t(row_of_bin[size_t(bin[k])])]++);
      rec[p] = Rec{it.doc[k], it.chunk[k], it.len[k], offset[k]};
    }
  }
  out.doc.resize(N);
  out.start.resize(N);
  out.length.resize(N);
  out.row.resize(N);
  out.offset.resize(N);
  for (int64_t r = 0; r < B; ++r) {
    for (int64_t p = out.row_ptr[size_t(r)]; p < out.row_ptr[size_t(r) + 1]; ++p) {
      const Rec& x = rec[size_t(p)];
      out.doc[size_t(p)] = x.doc;
      out.start[size_t(p)] = int64_t(x.chunk) * L;
      out.length[size_t(p)] = x.len;
      out.row[size_t(p)] = r;
      out.offset[size_t(p)] = x.offset;
      out.n_tokens += x.len;
    }
  }
  return out;
}

}  // namespace mllm_packing
