// Causal attention on MLX's CUDA backend through cuDNN with a top-left causal mask.
//
// Why this exists: mlx 0.32's `mx.fast.scaled_dot_product_attention(mask="causal")` asks cuDNN for a
// bottom-right aligned causal mask. For T_q == T_kv that is the same mask as the top-left one torch
// asks for, but cuDNN's flash backward runs 1.6x longer with it (same engine, same kernel
// configuration; bench/attention_backward.py). No option of MLX selects the other mask, so these
// two primitives build the same cuDNN graphs as MLX does, with `set_causal_mask(true)`, and add
// them to MLX's CUDA graph through cuDNN's native CUDA graph API, as MLX adds its own.
//
// Built on first use by mlxchat/cudnn_attention.py; only ever loaded on MLX's CUDA backend.

#include <nanobind/nanobind.h>

#include <dlfcn.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <unordered_map>

#include <cudnn_frontend.h>

#include "mlx/array.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace fe = cudnn_frontend;
using namespace mlx::core;

#ifdef NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
// The frontend resolves cuDNN's symbols through this handle, so the extension links no cuDNN of its
// own: it uses the library MLX has already loaded.
void* cudnn_frontend::cudnn_dlhandle = nullptr;
#endif

namespace {

enum Uid : int64_t { Q = 1, K, V, SCALE, O, STATS, D_O, D_Q, D_K, D_V };

void check(fe::error_t err, const char* what) {
  if (err.is_bad()) {
    throw std::runtime_error(std::string("cuDNN causal attention, ") + what + ": " + err.get_message());
  }
}

cudnnHandle_t handle_for(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, cudnnHandle_t> handles;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = handles.find(device);
  if (it == handles.end()) {
#ifdef NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
    if (!fe::cudnn_dlhandle) {
      fe::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_NOLOAD);
      if (!fe::cudnn_dlhandle) fe::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW);
      if (!fe::cudnn_dlhandle) throw std::runtime_error("cuDNN causal attention: libcudnn.so.9 cannot be loaded");
    }
#endif
    cu::device(device).make_current();
    cudnnHandle_t h;
    if (fe::detail::create_handle(&h) != CUDNN_STATUS_SUCCESS) {
      throw std::runtime_error("cudnnCreate failed");
    }
    it = handles.emplace(device, h).first;
  }
  return it->second;
}

// cuDNN needs each row of D contiguous and 16-byte aligned. The layouts gpt.attend hands over
// (views of (B, T, H, D) projections, and their gradients) always are; strides are only known
// when the graph runs, and MLX's copy kernels are not exported, so anything else is refused
// there instead of copied.
void check_layout(const array& x, const char* name) {
  if (x.strides(-1) != 1 || reinterpret_cast<uintptr_t>(gpu_ptr<void>(x)) % 16 != 0) {
    throw std::runtime_error(std::string("cuDNN causal attention: ") + name +
                             " needs its last axis contiguous and 16-byte aligned; pass mx.contiguous(x)");
  }
}

// cuDNN reads a singleton dimension's stride as layout information; MLX leaves it arbitrary.
std::vector<int64_t> strides_of(const array& x) {
  std::vector<int64_t> s(x.strides().begin(), x.strides().end());
  for (int i = x.ndim() - 2; i >= 0; --i) {
    if (x.shape(i) == 1) {
      s[i] = x.shape(i + 1) * s[i + 1];
    }
  }
  return s;
}

std::vector<int64_t> dims_of(const array& x) {
  return {x.shape().begin(), x.shape().end()};
}

fe::DataType_t cudnn_type(Dtype t) {
  if (t == bfloat16) return fe::DataType_t::BFLOAT16;
  if (t == float16) return fe::DataType_t::HALF;
  throw std::runtime_error("cuDNN causal attention takes bfloat16 or float16");
}

// An output laid out as `like` is (MLX's malloc_with_same_layout): the attention output of
// (B, T, H, D)-strided queries stays (B, T, H, D) in memory, so the reshape after it is free.
void alloc_like(array& out, const array& like) {
  auto data = allocator::malloc(out.nbytes());
  if (like.flags().row_contiguous) {
    out.set_data(std::move(data));
    return;
  }
  std::vector<int> order(like.ndim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return std::max<int64_t>(like.strides(a), 1) < std::max<int64_t>(like.strides(b), 1);
  });
  Strides strides(like.ndim());
  int64_t stride = 1;
  for (int i : order) {
    strides[i] = stride;
    stride *= out.shape(i);
  }
  out.set_data(std::move(data), out.size(), strides, {true, false, false});
}

std::shared_ptr<fe::graph::Tensor_attributes> tensor(fe::graph::Graph& g, const char* name, Uid uid, const array& x) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim(dims_of(x))
                      .set_stride(strides_of(x))
                      .set_data_type(x.dtype() == float32 ? fe::DataType_t::FLOAT : cudnn_type(x.dtype())));
}

void set_output(const std::shared_ptr<fe::graph::Tensor_attributes>& t, Uid uid, const array& x) {
  t->set_output(true).set_uid(uid).set_dim(dims_of(x)).set_stride(strides_of(x));
  if (x.dtype() == float32) t->set_data_type(fe::DataType_t::FLOAT);
}

std::shared_ptr<fe::graph::Graph> new_graph(Dtype dtype) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(cudnn_type(dtype))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return g;
}

std::shared_ptr<fe::graph::Tensor_attributes> scale_tensor(fe::graph::Graph& g) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name("scale")
                      .set_uid(SCALE)
                      .set_dim({1, 1, 1, 1})
                      .set_stride({1, 1, 1, 1})
                      .set_is_pass_by_value(true)
                      .set_data_type(fe::DataType_t::FLOAT));
}

void finalize(fe::graph::Graph& g, cudnnHandle_t h) {
  check(g.validate(), "validate");
  check(g.build_operation_graph(h), "operation graph");
  check(g.create_execution_plans({fe::HeurMode_t::A}), "execution plans");
  g.select_behavior_notes({fe::BehaviorNote_t::SUPPORTS_CUDA_GRAPH_NATIVE_API});
  check(g.check_support(h), "support");
  check(g.build_plans(h), "plans");
}

// What a graph is built for: its tensors' dtypes, shapes and strides.
std::string layout_key(const char* kind, int device, const std::vector<array>& xs) {
  std::string key = std::string(kind) + "|" + std::to_string(device);
  for (auto& x : xs) {
    key += "|" + std::to_string(static_cast<int>(x.dtype().val()));
    for (auto d : x.shape()) key += "," + std::to_string(d);
    key += ";";
    for (auto s : strides_of(x)) key += "," + std::to_string(s);
  }
  return key;
}

// A built graph and the CUDA graph cuDNN populated from it. Built once per layout (shapes,
// strides, dtype), as MLX caches its own; the CUDA graph is re-pointed at each call's buffers.
struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  std::string key;
  cudaGraph_t cuda_graph = nullptr;
  bool native = true;  // false once populating failed: stream capture instead
};

Plan& cached(const std::string& key, const std::function<std::shared_ptr<fe::graph::Graph>()>& build) {
  static std::mutex mutex;
  static std::unordered_map<std::string, Plan> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) {
    it = plans.emplace(key, Plan{build(), "cudnn_causal_attention:" + key}).first;
  }
  return it->second;
}

// Add a built graph to MLX's CUDA graph, as MLX adds its own cuDNN graphs: through cuDNN's native
// CUDA graph API (populated once, then only its pointers updated, so MLX can update rather than
// re-instantiate its executable graph), or by stream capture where the plan does not support it.
void run(cu::CommandEncoder& enc, Plan& plan, cudnnHandle_t h, std::unordered_map<int64_t, void*>& pack) {
  auto& g = *plan.graph;
  int64_t ws_size = 0;
  check(g.get_workspace_size(ws_size), "workspace size");
  void* ws = nullptr;
  if (ws_size > 0) {
    array workspace(allocator::malloc(ws_size), {static_cast<int>(ws_size)}, uint8);
    enc.add_temporary(workspace);
    ws = gpu_ptr<void>(workspace);
  }
  fe::detail::set_stream(h, enc.stream());
  if (plan.native) {
    fe::error_t err;
    if (!plan.cuda_graph) {
      if (fe::detail::cu_graph_create(&plan.cuda_graph, 0) != CUDA_SUCCESS) {
        throw std::runtime_error("cuDNN causal attention: cuGraphCreate failed");
      }
      err = g.populate_cuda_graph(h, pack, ws, plan.cuda_graph);
      if (err.is_bad()) plan.native = false;
    } else {
      check(g.update_cuda_graph(h, pack, ws, plan.cuda_graph), "graph update");
    }
    if (plan.native) {
      enc.add_graph_node(plan.cuda_graph, plan.key, true);
      return;
    }
  }
  fe::error_t err;
  {
    auto capture = enc.capture_context();
    fe::detail::set_stream(h, enc.stream());
    err = g.execute(h, pack, ws);
    if (err.is_bad()) capture.discard = true;
  }
  check(err, "execute");
}

// Where a primitive runs: its stream's encoder, the device, and that device's cuDNN handle.
struct Context {
  cu::CommandEncoder& enc;
  int device;
  cudnnHandle_t handle;
};

Context context_of(Stream s) {
  auto& enc = cu::get_command_encoder(s);
  int device = enc.device().cuda_device();
  return {enc, device, handle_for(device)};
}

// Tell MLX's CUDA graph what the primitive reads and writes, so it orders and keeps them.
void register_arrays(cu::CommandEncoder& enc, const std::vector<array>& in, const std::vector<array>& out) {
  for (auto& x : in) enc.set_input_array(x);
  for (auto& x : out) enc.set_output_array(x);
}

// What both primitives share: the scale they attend with, and no CPU path.
class ScaledAttention : public Primitive {
 public:
  ScaledAttention(Stream s, float scale) : Primitive(s), scale_(scale) {}

  void eval_cpu(const std::vector<array>&, std::vector<array>&) override {
    throw std::runtime_error("cuDNN causal attention runs on MLX's CUDA backend only");
  }

  bool is_equivalent(const Primitive& other) const override {
    return typeid(*this) == typeid(other) && scale_ == static_cast<const ScaledAttention&>(other).scale_;
  }

 protected:
  float scale_;
};

class CausalAttentionVJP : public ScaledAttention {
 public:
  using ScaledAttention::ScaledAttention;

  // inputs: q, k, v, o, stats, d_o; outputs: d_q, d_k, d_v
  void eval_gpu(const std::vector<array>& in, std::vector<array>& out) override {
    auto [enc, device, h] = context_of(stream());
    const char* names[] = {"q", "k", "v", "o", "stats", "the output's gradient"};
    for (int i = 0; i < 6; ++i) check_layout(in[i], names[i]);
    for (int i = 0; i < 3; ++i) alloc_like(out[i], in[i]);
    register_arrays(enc, in, out);
    auto& plan = cached(layout_key("bwd", device, {in[0], in[1], in[2], in[3], in[4], in[5], out[0], out[1], out[2]}), [&] {
      auto g = new_graph(in[0].dtype());
      auto opts = fe::graph::SDPA_backward_attributes()
                      .set_name("causal_attention_backward")
                      .set_attn_scale(scale_tensor(*g))
                      .set_causal_mask(true);
      auto [dq, dk, dv] = g->sdpa_backward(tensor(*g, "Q", Q, in[0]), tensor(*g, "K", K, in[1]), tensor(*g, "V", V, in[2]),
                                           tensor(*g, "O", O, in[3]), tensor(*g, "dO", D_O, in[5]),
                                           tensor(*g, "Stats", STATS, in[4]), opts);
      set_output(dq, D_Q, out[0]);
      set_output(dk, D_K, out[1]);
      set_output(dv, D_V, out[2]);
      finalize(*g, h);
      return g;
    });
    float scale = scale_;
    std::unordered_map<int64_t, void*> pack{
        {Q, gpu_ptr<void>(in[0])},   {K, gpu_ptr<void>(in[1])},    {V, gpu_ptr<void>(in[2])},
        {O, gpu_ptr<void>(in[3])},   {STATS, gpu_ptr<void>(in[4])}, {D_O, gpu_ptr<void>(in[5])},
        {D_Q, gpu_ptr<void>(out[0])}, {D_K, gpu_ptr<void>(out[1])}, {D_V, gpu_ptr<void>(out[2])},
        {SCALE, &scale}};
    run(enc, plan, h, pack);
  }

  const char* name() const override {
    return "CausalAttentionVJP";
  }
};

class CausalAttention : public ScaledAttention {
 public:
  using ScaledAttention::ScaledAttention;

  // inputs: q, k, v; outputs: o, stats (B, H, T, 1) float32, the softmax statistics the backward reads
  void eval_gpu(const std::vector<array>& in, std::vector<array>& out) override {
    auto [enc, device, h] = context_of(stream());
    check_layout(in[0], "q");
    check_layout(in[1], "k");
    check_layout(in[2], "v");
    alloc_like(out[0], in[0]);
    out[1].set_data(allocator::malloc(out[1].nbytes()));
    register_arrays(enc, in, out);
    auto& plan = cached(layout_key("fwd", device, {in[0], in[1], in[2], out[0], out[1]}), [&] {
      auto g = new_graph(in[0].dtype());
      auto opts = fe::graph::SDPA_attributes()
                      .set_name("causal_attention")
                      .set_attn_scale(scale_tensor(*g))
                      .set_generate_stats(true)
                      .set_causal_mask(true);
      auto [o, stats] = g->sdpa(tensor(*g, "Q", Q, in[0]), tensor(*g, "K", K, in[1]), tensor(*g, "V", V, in[2]), opts);
      set_output(o, O, out[0]);
      set_output(stats, STATS, out[1]);
      finalize(*g, h);
      return g;
    });
    float scale = scale_;
    std::unordered_map<int64_t, void*> pack{{Q, gpu_ptr<void>(in[0])}, {K, gpu_ptr<void>(in[1])},
                                            {V, gpu_ptr<void>(in[2])}, {O, gpu_ptr<void>(out[0])},
                                            {STATS, gpu_ptr<void>(out[1])}, {SCALE, &scale}};
    run(enc, plan, h, pack);
  }

  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                         const std::vector<int>& argnums, const std::vector<array>& outputs) override {
    // The cotangent of the statistics is ignored: they are an implementation detail, never a
    // result the caller differentiates.
    auto grads = array::make_arrays({primals[0].shape(), primals[1].shape(), primals[2].shape()},
                                    {primals[0].dtype(), primals[1].dtype(), primals[2].dtype()},
                                    std::make_shared<CausalAttentionVJP>(stream(), scale_),
                                    {primals[0], primals[1], primals[2], outputs[0], outputs[1], cotangents[0]});
    std::vector<array> result;
    for (int i : argnums) result.push_back(grads[i]);
    return result;
  }

  const char* name() const override {
    return "CausalAttention";
  }
};

array causal_attention(const array& q, const array& k, const array& v, float scale) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) {
    throw std::invalid_argument("causal_attention takes (B, H, T, D) queries, keys and values");
  }
  auto s = default_stream(default_device());
  Shape stats_shape{q.shape(0), q.shape(1), q.shape(2), 1};
  auto outs = array::make_arrays({q.shape(), stats_shape}, {q.dtype(), float32},
                                 std::make_shared<CausalAttention>(s, scale), {q, k, v});
  return outs[0];
}

}  // namespace

NB_MODULE(_mlxchat_cudnn_attention, m) {
  m.doc() = "Causal attention through cuDNN with a top-left mask, as an MLX primitive";
  m.def("causal_attention", &causal_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("scale"),
        "softmax(q k^T * scale + causal) v for (B, H, T, D) arrays on MLX's CUDA backend");
}
