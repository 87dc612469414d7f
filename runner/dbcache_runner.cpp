// dbcache_runner: load an AOTInductor package of the cached transformer step (dbcache_compile.export) and run a
// flow-matching Euler denoising loop with it, without Python and without compiling.
//
//   dbcache_runner PACKAGE.pt2 INPUTS.pt OUTPUT.pt
//
// INPUTS.pt (written by dbcache_compile.export.write_runner_inputs, torch.save format) is a list of tensors:
//   [sigmas (N+1, float32), num_state (int64 scalar), shape set index (int64 scalar), then that shape set's flat
//    inputs in export order: hidden_states (initial latents), timestep, step, counters, fn_residual, ladders...,
//    other inputs...]
// A package holds one AOTInductor model per shape set (the call signatures it was exported for): shape set i is the
// archive's model "model" (i = 0) or "model_<i>" (dbcache_compile.export.model_name). The model checks its inputs'
// dtypes, sizes, strides and device at every call (AOTI_RUNTIME_CHECK_INPUTS, set here unless already set): inputs
// of another shape are an error, not a wrong image.
// OUTPUT.pt (torch.load-able) is a list: [final latents, hit predicate per step (N, bool)].
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " PACKAGE.pt2 INPUTS.pt OUTPUT.pt\n";
    return 2;
  }
  try {
    torch::NoGradGuard no_grad;
    setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);  // read once, by the model's first run
    const c10::IValue loaded = torch::pickle_load(read_file(argv[2]));
    std::vector<at::Tensor> inputs;
    for (const c10::IValue& item : loaded.toListRef()) inputs.push_back(item.toTensor());
    if (inputs.size() < 8) throw std::runtime_error("INPUTS.pt holds too few tensors");
    const at::Tensor sigmas = inputs[0].to(torch::kFloat32);
    const int64_t num_state = inputs[1].item<int64_t>();
    const int64_t shape_set = inputs[2].item<int64_t>();
    const std::string model = shape_set == 0 ? "model" : "model_" + std::to_string(shape_set);
    torch::inductor::AOTIModelPackageLoader loader(argv[1], model);
    std::vector<at::Tensor> flat(inputs.begin() + 3, inputs.end());
    const int64_t steps = sigmas.size(0) - 1;
    const at::Tensor timestep_template = flat[1];
    at::Tensor x = flat[0];
    std::vector<at::Tensor> hits;
    for (int64_t i = 0; i < steps; ++i) {
      flat[0] = x;
      flat[1] = torch::full_like(timestep_template, sigmas[i].item<float>());
      flat[2] = torch::tensor(i, torch::dtype(torch::kInt64).device(x.device()));
      std::vector<at::Tensor> out = loader.run(flat);
      for (int64_t j = 0; j < num_state; ++j) flat[3 + j] = out[3 + j];
      hits.push_back(out[1].to(torch::kCPU));
      // FlowMatchEulerDiscreteScheduler.step: x + (sigma_next - sigma) * v, computed in float32
      const float dt = sigmas[i + 1].item<float>() - sigmas[i].item<float>();
      x = (x.to(torch::kFloat32) + dt * out[0].to(torch::kFloat32)).to(x.scalar_type());
    }
    std::vector<char> bytes = torch::pickle_save(c10::List<at::Tensor>({x.to(torch::kCPU), torch::stack(hits)}));
    std::ofstream(argv[3], std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    std::cout << "dbcache_runner: " << steps << " steps, " << torch::stack(hits).sum().item<int64_t>()
              << " cached\n";
  } catch (const std::exception& e) {
    std::cerr << "dbcache_runner: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
