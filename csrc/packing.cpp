// mllm._C: Python binding of the packing algorithm in packing.h (numpy in and out, no torch ABI).
//
//   pack(lengths: np.ndarray[int64, 1-D], row_len: int, algorithm: "bfd"|"ffd", overflow: "split"|"truncate",
//        seed: int | None) -> dict
//
// The dict holds int64 arrays "doc", "start", "length", "row", "offset" (one entry per placed segment, in
// (row, offset) order), "row_ptr" [n_rows + 1], and ints "n_rows", "n_tokens", "n_dropped". The GIL is
// released while packing. Bad input raises std::invalid_argument, which pybind11 turns into ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "packing.h"

namespace py = pybind11;

namespace {

// Hands a vector's buffer to numpy without copying: the capsule owns the vector.
py::array_t<int64_t> to_numpy(mllm_packing::Vec<int64_t>&& v) {
  using V = mllm_packing::Vec<int64_t>;
  auto* heap = new V(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<V*>(p); });
  return py::array_t<int64_t>({py::ssize_t(heap->size())}, {py::ssize_t(sizeof(int64_t))}, heap->data(), owner);
}

std::optional<uint64_t> parse_seed(const py::object& seed) {
  if (seed.is_none()) return std::nullopt;
  if (py::isinstance<py::bool_>(seed) || !py::isinstance<py::int_>(seed))
    throw std::invalid_argument("seed must be None or an int in [0, 2**64), got " + std::string(py::repr(seed)));
  const py::int_ s = seed;
  if (s < py::int_(0) || s >= (py::int_(1) << py::int_(64)))
    throw std::invalid_argument("seed must be None or an int in [0, 2**64), got " + std::string(py::str(seed)));
  return s.cast<uint64_t>();
}

py::dict pack_py(const py::array& lengths, int64_t row_len, const std::string& algorithm,
                 const std::string& overflow, const py::object& seed) {
  if (lengths.ndim() != 1)
    throw std::invalid_argument("lengths must be 1-D, got " + std::to_string(lengths.ndim()) + " dimensions");
  // equivalence, not identity: np.longlong or a native-order int64 with metadata is the same type to numpy
  if (!py::detail::npy_api::get().PyArray_EquivTypes_(lengths.dtype().ptr(), py::dtype::of<int64_t>().ptr()))
    throw std::invalid_argument("lengths must have dtype int64, got " + std::string(py::str(lengths.dtype())));
  const auto algo = mllm_packing::parse_algorithm(algorithm);
  const auto ovf = mllm_packing::parse_overflow(overflow);
  const auto sd = parse_seed(seed);

  // Copied while the GIL is held: the packer reads each length twice (count, then place), so a Python thread
  // writing into the array once the GIL is released could make the second pass write past arrays sized by the
  // first (a crash, not a wrong answer). The copy costs ~1 ms per million documents against ~65 ms to pack them.
  const auto view = lengths.unchecked<int64_t, 1>();
  const size_t n = static_cast<size_t>(view.shape(0));
  std::vector<int64_t> copy(n);
  if (n > 0 && lengths.strides(0) == py::ssize_t(sizeof(int64_t)))
    std::memcpy(copy.data(), lengths.data(), n * sizeof(int64_t));
  else
    for (size_t i = 0; i < n; ++i) copy[i] = view(py::ssize_t(i));
  const int64_t* data = copy.data();

  mllm_packing::PackOutput out;
  {
    py::gil_scoped_release release;
    out = mllm_packing::pack(data, n, row_len, algo, ovf, sd);
  }
  py::dict d;
  d["doc"] = to_numpy(std::move(out.doc));
  d["start"] = to_numpy(std::move(out.start));
  d["length"] = to_numpy(std::move(out.length));
  d["row"] = to_numpy(std::move(out.row));
  d["offset"] = to_numpy(std::move(out.offset));
  d["row_ptr"] = to_numpy(std::move(out.row_ptr));
  d["n_rows"] = out.n_rows;
  d["n_tokens"] = out.n_tokens;
  d["n_dropped"] = out.n_dropped;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mllm C++ extension: sequence packing (best-fit / first-fit decreasing). See csrc/packing.h.";
  m.def("pack", &pack_py, py::arg("lengths"), py::arg("row_len"), py::arg("algorithm") = "bfd",
        py::arg("overflow") = "split", py::arg("seed") = py::none(),
        "Pack documents of the given token lengths into rows of row_len tokens; see csrc/packing.h for the "
        "exact specification. Returns a dict of int64 numpy arrays (doc, start, length, row, offset, row_ptr) "
        "and ints (n_rows, n_tokens, n_dropped).");
  m.attr("MAX_ROW_LEN") = mllm_packing::kMaxRowLen;
}
