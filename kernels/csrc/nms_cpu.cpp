// Greedy NMS on the CPU with exact py_cpu_nms semantics, pruned by a size-levelled spatial grid.
//
// Result: exactly the greedy answer (suppress j when IoU(kept i, j) > thr for some kept i ranked before j),
// with the IoU computed in the input precision in the reference's operation order. Pruning only skips pairs
// that provably cannot exceed the threshold:
//  * for thr >= 0, boxes whose intersection width or height (min(x2) - max(x1) + 1) is <= 0 have IoU 0 (or NaN);
//    the test against a tile's union box is exact because float subtraction and addition are monotone;
//  * for thr > 0 and positive sizes, IoU <= min(w_i, w_j) / max(w_i, w_j) (same for h); a tile whose width and
//    height ranges miss that bound by a 1e-4 relative margin (far above the few-ulp rounding) is skipped.
// Boxes are grouped by size level (floor(log2(max(w, h)))) and, within a level, by the grid cell (a quarter of the
// level's size) holding their centre; for thr > 0 only cells whose centres can lie within (1 - thr) / thr of box
// i's size of its centre are visited (see suppress_from); each tile keeps its live members in score order and compacts them as it is scanned.
#include "kernels_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

constexpr double kSizeMargin = 1e-4;
constexpr int64_t kMaxDenseCells = 1 << 20;
constexpr double kMaxCoord = 1e12;
constexpr int kCellShift = 2;  // grid cells are a quarter of their level's box size

template <typename T>
struct Boxes {  // structure of arrays, in score order
  std::vector<T> x1, y1, x2, y2, area;
  std::vector<int64_t> rank;
  void resize(size_t n) {
    x1.resize(n); y1.resize(n); x2.resize(n); y2.resize(n); area.resize(n); rank.resize(n);
  }
  void copy(size_t dst, const Boxes& src, size_t s) {
    x1[dst] = src.x1[s]; y1[dst] = src.y1[s]; x2[dst] = src.x2[s]; y2[dst] = src.y2[s];
    area[dst] = src.area[s]; rank[dst] = src.rank[s];
  }
};

template <typename T>
inline bool suppresses(T ax1, T ay1, T ax2, T ay2, T aarea, T bx1, T by1, T bx2, T by2, T barea, T thr) {
  T w = std::max(T(0), std::min(ax2, bx2) - std::max(ax1, bx1) + T(1));
  T h = std::max(T(0), std::min(ay2, by2) - std::max(ay1, by1) + T(1));
  T inter = w * h;
  T ovr = inter / (aarea + barea - inter);
  return ovr > thr;
}

struct Range {
  double lo = INFINITY, hi = -INFINITY;
  void add(double v) { lo = std::min(lo, v); hi = std::max(hi, v); }
};

// Largest possible min/max ratio between v and a value in r (1 when v lies inside r).
inline double best_ratio(double v, const Range& r) {
  if (v > r.hi) return r.hi / v;
  if (v < r.lo) return v / r.lo;
  return 1.0;
}

template <typename T>
struct Tile {
  int64_t begin = 0, count = 0;
  T ux1, uy1, ux2, uy2;  // union box of the live members
  Range w, h;
};

template <typename T>
struct Level {
  bool sized = true;  // false: the group of boxes with a non-positive width or height
  double cell = 1;
  Range w, h;
  std::vector<int> tiles;
  int64_t gx0 = 0, gy0 = 0, nx = 0, ny = 0;
  std::vector<int> dense;  // (gx - gx0) * ny + (gy - gy0) -> tile id, -1 if none; empty: scan `tiles`
};

// max_keep > 0 stops the greedy scan once that many boxes are kept: the kept list is built best first and a box's
// fate depends only on the boxes ranked before it, so this is the full answer truncated, at a fraction of the cost.
template <typename T>
std::vector<int64_t> nms_simple(const Boxes<T>& b, T thr, int64_t max_keep) {
  const int64_t n = static_cast<int64_t>(b.x1.size());
  std::vector<uint8_t> dead(n, 0);
  std::vector<int64_t> keep;
  for (int64_t i = 0; i < n; ++i) {
    if (dead[i]) continue;
    keep.push_back(i);
    if (static_cast<int64_t>(keep.size()) == max_keep) break;
    for (int64_t j = i + 1; j < n; ++j)
      if (!dead[j] && suppresses(b.x1[i], b.y1[i], b.x2[i], b.y2[i], b.area[i], b.x1[j], b.y1[j], b.x2[j], b.y2[j],
                                 b.area[j], thr))
        dead[j] = 1;
  }
  return keep;
}

template <typename T>
class TiledNms {
 public:
  TiledNms(const Boxes<T>& sorted, T thr) : b_(sorted), thr_(thr), size_prune_(thr > 0) { build(); }

  std::vector<int64_t> run(int64_t max_keep) {
    const int64_t n = static_cast<int64_t>(b_.x1.size());
    dead_.assign(n, 0);
    std::vector<int64_t> keep;
    for (int64_t i = 0; i < n; ++i) {
      if (dead_[i]) continue;
      keep.push_back(i);
      if (static_cast<int64_t>(keep.size()) == max_keep) break;
      suppress_from(i);
    }
    return keep;
  }

 private:
  const Boxes<T>& b_;
  T thr_;
  bool size_prune_;
  Boxes<T> m_;  // members, grouped by tile
  std::vector<Tile<T>> tiles_;
  std::vector<Level<T>> levels_;
  std::vector<uint8_t> dead_;

  static int level_of(T w, T h) {
    if (!(w > 0 && h > 0)) return -1;
    int lv = std::ilogb(static_cast<double>(std::max(w, h)));
    return std::min(std::max(lv, 0), 60);
  }

  void build() {
    const int64_t n = static_cast<int64_t>(b_.x1.size());
    levels_.resize(62);
    levels_[61].sized = false;
    for (int lv = 0; lv <= 60; ++lv) levels_[lv].cell = std::ldexp(1.0, lv - kCellShift);
    // tile key per box: (level slot, gx, gy); bucket boxes by sorting the keys (stable keeps score order).
    std::vector<int> slot(n);
    std::vector<int64_t> gx(n), gy(n);
    for (int64_t i = 0; i < n; ++i) {
      T w = b_.x2[i] - b_.x1[i] + T(1), h = b_.y2[i] - b_.y1[i] + T(1);
      int lv = level_of(w, h);
      slot[i] = lv < 0 ? 61 : lv;
      double c = levels_[slot[i]].cell;
      if (lv < 0) {
        gx[i] = gy[i] = 0;
      } else {
        gx[i] = static_cast<int64_t>(std::floor(0.5 * (double(b_.x1[i]) + double(b_.x2[i])) / c));
        gy[i] = static_cast<int64_t>(std::floor(0.5 * (double(b_.y1[i]) + double(b_.y2[i])) / c));
        levels_[lv].w.add(double(w));
        levels_[lv].h.add(double(h));
      }
    }
    std::vector<int64_t> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t c) {
      if (slot[a] != slot[c]) return slot[a] < slot[c];
      if (gx[a] != gx[c]) return gx[a] < gx[c];
      return gy[a] < gy[c];
    });
    m_.resize(n);
    std::vector<std::pair<int64_t, int64_t>> cell_of_tile;
    for (int64_t k = 0; k < n; ++k) {
      int64_t i = idx[k];
      m_.copy(k, b_, i);
      m_.rank[k] = i;
      bool fresh = k == 0 || slot[i] != slot[idx[k - 1]] || gx[i] != gx[idx[k - 1]] || gy[i] != gy[idx[k - 1]];
      if (fresh) {
        Tile<T> t;
        t.begin = k;
        t.ux1 = b_.x1[i]; t.uy1 = b_.y1[i]; t.ux2 = b_.x2[i]; t.uy2 = b_.y2[i];
        levels_[slot[i]].tiles.push_back(static_cast<int>(tiles_.size()));
        tiles_.push_back(t);
        cell_of_tile.emplace_back(gx[i], gy[i]);
      }
      Tile<T>& t = tiles_.back();
      t.count++;
      t.ux1 = std::min(t.ux1, b_.x1[i]); t.uy1 = std::min(t.uy1, b_.y1[i]);
      t.ux2 = std::max(t.ux2, b_.x2[i]); t.uy2 = std::max(t.uy2, b_.y2[i]);
      t.w.add(double(b_.x2[i] - b_.x1[i] + T(1)));
      t.h.add(double(b_.y2[i] - b_.y1[i] + T(1)));
    }
    for (int lv = 0; lv <= 60; ++lv) {
      Level<T>& L = levels_[lv];
      if (L.tiles.empty()) continue;
      int64_t x0 = INT64_MAX, x1 = INT64_MIN, y0 = INT64_MAX, y1 = INT64_MIN;
      for (int t : L.tiles) {
        x0 = std::min(x0, cell_of_tile[t].first); x1 = std::max(x1, cell_of_tile[t].first);
        y0 = std::min(y0, cell_of_tile[t].second); y1 = std::max(y1, cell_of_tile[t].second);
      }
      int64_t nx = x1 - x0 + 1, ny = y1 - y0 + 1;
      if (nx > kMaxDenseCells || ny > kMaxDenseCells || nx * ny > kMaxDenseCells) continue;
      L.gx0 = x0; L.gy0 = y0; L.nx = nx; L.ny = ny;
      L.dense.assign(nx * ny, -1);
      for (int t : L.tiles) L.dense[(cell_of_tile[t].first - x0) * ny + (cell_of_tile[t].second - y0)] = t;
    }
  }

  bool size_rules_out(double wi, double hi, const Range& w, const Range& h) const {
    if (!size_prune_ || !(wi > 0 && hi > 0)) return false;
    double t = static_cast<double>(thr_);
    return best_ratio(wi, w) * (1 + kSizeMargin) < t || best_ratio(hi, h) * (1 + kSizeMargin) < t;
  }

  void scan_tile(int64_t i, Tile<T>& t) {
    const T ix1 = b_.x1[i], iy1 = b_.y1[i], ix2 = b_.x2[i], iy2 = b_.y2[i], ia = b_.area[i];
    if (!(std::min(ix2, t.ux2) - std::max(ix1, t.ux1) + T(1) > 0) ||
        !(std::min(iy2, t.uy2) - std::max(iy1, t.uy1) + T(1) > 0))
      return;
    int64_t w = t.begin, end = t.begin + t.count;
    T ux1 = INFINITY, uy1 = INFINITY, ux2 = -INFINITY, uy2 = -INFINITY;
    for (int64_t k = t.begin; k < end; ++k) {
      int64_t j = m_.rank[k];
      if (j <= i || dead_[j]) continue;  // decided already: kept (j <= i) or suppressed
      if (suppresses(ix1, iy1, ix2, iy2, ia, m_.x1[k], m_.y1[k], m_.x2[k], m_.y2[k], m_.area[k], thr_)) {
        dead_[j] = 1;
        continue;
      }
      if (w != k) m_.copy(w, m_, k);
      ux1 = std::min(ux1, m_.x1[w]); uy1 = std::min(uy1, m_.y1[w]);
      ux2 = std::max(ux2, m_.x2[w]); uy2 = std::max(uy2, m_.y2[w]);
      ++w;
    }
    t.count = w - t.begin;
    t.ux1 = ux1; t.uy1 = uy1; t.ux2 = ux2; t.uy2 = uy2;
  }

  void suppress_from(int64_t i) {
    const double ix1 = b_.x1[i], iy1 = b_.y1[i], ix2 = b_.x2[i], iy2 = b_.y2[i];
    const double wi = double(b_.x2[i] - b_.x1[i] + T(1)), hi = double(b_.y2[i] - b_.y1[i] + T(1));
    for (Level<T>& L : levels_) {
      if (L.tiles.empty()) continue;
      if (L.sized && size_rules_out(wi, hi, L.w, L.h)) continue;
      // The members' centres that can matter: for thr > 0, IoU > thr needs an intersection width
      // iw > thr * max(wi, wj) and wj < wi / thr, while iw <= (wi + wj) / 2 - |cxi - cxj|, so
      // |cxi - cxj| < (wi + wj) / 2 - thr * max(wi, wj) <= wi (1 - thr) / thr (same for y); the bound is widened by
      // a relative 1e-3 and 2 px against rounding. Otherwise (thr <= 0, a non-positive size) a member must reach
      // box i, and its centre lies within its half extent (< 4 cells) of its box.
      int64_t cx0 = 0, cx1 = -1, cy0 = 0, cy1 = -1;
      bool use_dense = !L.dense.empty();
      if (use_dense) {
        double lx, hx, ly, hy;
        if (size_prune_ && L.sized && wi > 0 && hi > 0 && thr_ < 1) {
          const double t = static_cast<double>(thr_), k = (1 - t) / t * (1 + 1e-3);
          const double cxi = 0.5 * (ix1 + ix2), cyi = 0.5 * (iy1 + iy2);
          lx = cxi - k * wi - 2; hx = cxi + k * wi + 2; ly = cyi - k * hi - 2; hy = cyi + k * hi + 2;
        } else {
          const double pad = L.cell * (1 << kCellShift);
          lx = ix1 - 2 - pad; hx = ix2 + 2 + pad; ly = iy1 - 2 - pad; hy = iy2 + 2 + pad;
        }
        cx0 = std::max<int64_t>(L.gx0, int64_t(std::floor(lx / L.cell)) - 1);
        cx1 = std::min<int64_t>(L.gx0 + L.nx - 1, int64_t(std::floor(hx / L.cell)) + 1);
        cy0 = std::max<int64_t>(L.gy0, int64_t(std::floor(ly / L.cell)) - 1);
        cy1 = std::min<int64_t>(L.gy0 + L.ny - 1, int64_t(std::floor(hy / L.cell)) + 1);
        if (cx1 < cx0 || cy1 < cy0) continue;
        use_dense = (cx1 - cx0 + 1) * (cy1 - cy0 + 1) <= static_cast<int64_t>(L.tiles.size());
      }
      auto visit = [&](int id) {
        Tile<T>& t = tiles_[id];
        if (t.count == 0) return;
        if (L.sized && size_rules_out(wi, hi, t.w, t.h)) return;
        scan_tile(i, t);
      };
      if (use_dense) {
        for (int64_t gx = cx0; gx <= cx1; ++gx) {
          const int* row = L.dense.data() + (gx - L.gx0) * L.ny;
          for (int64_t gy = cy0; gy <= cy1; ++gy)
            if (row[gy - L.gy0] >= 0) visit(row[gy - L.gy0]);
        }
      } else {
        for (int id : L.tiles) visit(id);
      }
    }
  }
};

template <typename T>
at::Tensor nms_impl(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold, int64_t max_keep) {
  const int64_t n = boxes.size(0);
  const T* bx = boxes.data_ptr<T>();
  const T* sc = scores.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK_VALUE(!std::isnan(sc[i]), "scores contain NaN");
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // py-faster-rcnn's order, scores.argsort()[::-1]: decreasing score, equal scores by decreasing index.
  std::sort(order.begin(), order.end(),
            [sc](int64_t a, int64_t b) { return sc[a] > sc[b] || (sc[a] == sc[b] && a > b); });
  Boxes<T> s;
  s.resize(n);
  double max_abs = 0;
  for (int64_t r = 0; r < n; ++r) {
    const T* p = bx + 4 * order[r];
    s.x1[r] = p[0]; s.y1[r] = p[1]; s.x2[r] = p[2]; s.y2[r] = p[3];
    s.area[r] = (p[2] - p[0] + T(1)) * (p[3] - p[1] + T(1));
    s.rank[r] = r;
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK_VALUE(std::isfinite(p[k]), "boxes contain NaN or infinite coordinates");
      max_abs = std::max(max_abs, std::abs(double(p[k])));
    }
  }
  const T thr = static_cast<T>(iou_threshold);
  std::vector<int64_t> kept_ranks;
  if (n < 64 || !(thr >= 0) || max_abs > kMaxCoord) {
    kept_ranks = nms_simple(s, thr, max_keep);
  } else {
    kept_ranks = TiledNms<T>(s, thr).run(max_keep);
  }
  at::Tensor keep = at::empty({static_cast<int64_t>(kept_ranks.size())}, boxes.options().dtype(at::kLong));
  int64_t* out = keep.data_ptr<int64_t>();
  for (size_t k = 0; k < kept_ranks.size(); ++k) out[k] = order[kept_ranks[k]];
  return keep;
}

}  // namespace

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold, int64_t max_keep) {
  TORCH_CHECK(boxes.device().is_cpu() && boxes.dim() == 2 && boxes.size(1) == 4, "nms: boxes must be CPU [N, 4]");
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), "nms: scores must be [N]");
  TORCH_CHECK(scores.scalar_type() == boxes.scalar_type(), "nms: scores and boxes must share a dtype");
  at::Tensor b = boxes.contiguous(), s = scores.contiguous();
  at::Tensor keep;
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "nms_cpu", [&] { keep = nms_impl<scalar_t>(b, s, iou_threshold, max_keep); });
  return keep;
}
