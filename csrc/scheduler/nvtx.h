// NVTX ranges per task, pushed on the lane thread that runs or launches it (env-gated).
//
// AVATAR_NVTX=1 turns them on; the library is opened at run time (AVATAR_NVTX_LIB, else
// libnvToolsExt.so.1, which the CUDA torch wheels ship as nvidia-nvtx), so the extension imports
// and runs without it. Off, or with no library found, a range costs one branch.
#pragma once

#include <dlfcn.h>

#include <cstdlib>
#include <string>

namespace avatar_sched {

struct NvtxApi {
  int (*push)(const char*) = nullptr;
  int (*pop)() = nullptr;
  std::string source;  // the library in use; empty when off
};

inline NvtxApi load_nvtx() {
  NvtxApi api;
  const char* on = std::getenv("AVATAR_NVTX");
  if (!on || std::string(on) != "1") return api;
  const char* override_lib = std::getenv("AVATAR_NVTX_LIB");
  const char* candidates[] = {override_lib, "libnvToolsExt.so.1", "libnvToolsExt.so"};
  for (const char* lib : candidates) {
    if (!lib || !*lib) continue;
    void* handle = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    if (!handle) continue;
    api.push = reinterpret_cast<int (*)(const char*)>(dlsym(handle, "nvtxRangePushA"));
    api.pop = reinterpret_cast<int (*)()>(dlsym(handle, "nvtxRangePop"));
    if (api.push && api.pop) {
      api.source = lib;
      return api;
    }
    api = NvtxApi();
  }
  return api;
}

inline const NvtxApi& nvtx_api() {
  static const NvtxApi api = load_nvtx();  // read once: the env is fixed for the process
  return api;
}

class NvtxRange {
 public:
  explicit NvtxRange(const std::string& name) : api_(nvtx_api()) {
    if (api_.push) api_.push(name.c_str());
  }
  ~NvtxRange() {
    if (api_.pop) api_.pop();
  }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;

 private:
  const NvtxApi& api_;
};

}  // namespace avatar_sched
