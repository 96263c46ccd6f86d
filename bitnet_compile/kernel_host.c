/* kernel_host: runs an artifact's kernels for another architecture (under qemu user-mode
 * emulation) on behalf of a Python process on the build machine.
 *
 * Why a C program: the kernels are TVM-FFI functions in kernels.so; on the emulated
 * architecture there is no Python, so this program does what bitnet_runtime does on a device:
 * load TVM's libtvm_ffi.so and libtvm_runtime.so (RTLD_GLOBAL: kernels name TVMFFI* symbols
 * as plain undefined ones), load kernels.so, fill its runtime-service slots (thread pool,
 * workspaces) from libtvm_runtime, then call kernels by name.
 *
 * Usage: kernel_host LIBTVM_FFI LIBTVM_RUNTIME KERNELS_SO    (requests on stdin)
 *
 * Protocol (little-endian, native sizes), one request per call:
 *   request:  u32 name_len, name bytes, u32 nargs, then per argument
 *             u8 dtype code, u8 bits, u16 lanes, u32 ndim, i64 shape[ndim], u64 nbytes, data
 *   response: i32 status (0 ok), u32 msg_len, msg bytes, then every argument's data again
 *             (the kernel writes its outputs in place; inputs come back unchanged)
 * Before the first request the host writes the 4 bytes "RDY\n", so the caller knows loading
 * worked. EOF on stdin ends the program.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <dlpack/dlpack.h>
#include <tvm/ffi/c_api.h>

#define MAX_ARGS 16
#define MAX_DIMS 8
#define ALIGN 64

static const char* SLOTS[] = {
    "__TVMBackendParallelLaunch", "__TVMBackendParallelBarrier",
    "__TVMBackendAllocWorkspace", "__TVMBackendFreeWorkspace",
};

static int read_exact(void* dst, size_t n) {
  return fread(dst, 1, n, stdin) == n;
}

static void write_exact(const void* src, size_t n) {
  if (fwrite(src, 1, n, stdout) != n) exit(3);
}

static void die(const char* what, const char* detail) {
  fprintf(stderr, "kernel_host: %s: %s\n", what, detail ? detail : "");
  exit(2);
}

static void* load(const char* path, int flags) {
  void* handle = dlopen(path, flags);
  if (!handle) die("cannot load library", dlerror());
  return handle;
}

/* Point kernels.so's service slots at libtvm_runtime's exported functions (the slot name
 * without its "__" prefix), as libtvm_ffi does when it loads a module. */
static void fill_slots(void* kernels, void* runtime) {
  for (size_t i = 0; i < sizeof(SLOTS) / sizeof(SLOTS[0]); ++i) {
    void** slot = (void**)dlsym(kernels, SLOTS[i]);
    if (!slot) continue; /* a service the kernels never call */
    void* fn = dlsym(runtime, SLOTS[i] + 2);
    if (!fn) die("libtvm_runtime lacks", SLOTS[i] + 2);
    *slot = fn;
  }
}

/* libtvm_ffi's error API, looked up at load time (the program links nothing of TVM's). */
static void (*move_from_raised)(TVMFFIObjectHandle*);
static int (*dec_ref)(TVMFFIObjectHandle);

/* The message of the error a failed kernel raised (TVM-FFI keeps it in thread-local state). */
static void raised_message(char* out, size_t cap) {
  TVMFFIObjectHandle err = NULL;
  move_from_raised(&err);
  snprintf(out, cap, "kernel failed");
  if (!err) return;
  TVMFFIErrorCell* cell = (TVMFFIErrorCell*)((char*)err + sizeof(TVMFFIObject));
  snprintf(out, cap, "%.*s: %.*s", (int)cell->kind.size, cell->kind.data, (int)cell->message.size, cell->message.data);
  dec_ref(err);
}

typedef struct {
  DLTensor tensor;
  int64_t shape[MAX_DIMS];
  void* data;
  uint64_t nbytes;
} Arg;

static int read_arg(Arg* a) {
  uint8_t code, bits;
  uint16_t lanes;
  uint32_t ndim;
  if (!read_exact(&code, 1) || !read_exact(&bits, 1) || !read_exact(&lanes, 2) || !read_exact(&ndim, 4)) return 0;
  if (ndim > MAX_DIMS) die("too many dimensions", NULL);
  if (!read_exact(a->shape, 8 * ndim) || !read_exact(&a->nbytes, 8)) return 0;
  a->data = aligned_alloc(ALIGN, (a->nbytes + ALIGN - 1) / ALIGN * ALIGN + ALIGN);
  if (!a->data) die("out of memory", NULL);
  if (!read_exact(a->data, a->nbytes)) return 0;
  memset(&a->tensor, 0, sizeof(a->tensor));
  a->tensor.data = a->data;
  a->tensor.device.device_type = kDLCPU;
  a->tensor.ndim = (int32_t)ndim;
  a->tensor.dtype.code = code;
  a->tensor.dtype.bits = bits;
  a->tensor.dtype.lanes = lanes;
  a->tensor.shape = a->shape;
  return 1;
}

/* Serve one request; 0 at a clean EOF. */
static int serve(void* kernels) {
  uint32_t name_len, nargs;
  char name[512], symbol[600], msg[1024] = "";
  Arg args[MAX_ARGS];
  TVMFFIAny packed[MAX_ARGS], result;
  if (!read_exact(&name_len, 4)) return 0;
  if (name_len >= sizeof(name) || !read_exact(name, name_len) || !read_exact(&nargs, 4) || nargs > MAX_ARGS)
    die("malformed request", NULL);
  name[name_len] = 0;
  for (uint32_t i = 0; i < nargs; ++i) {
    if (!read_arg(&args[i])) die("truncated request", name);
    memset(&packed[i], 0, sizeof(packed[i]));
    packed[i].type_index = kTVMFFIDLTensorPtr;
    packed[i].v_ptr = &args[i].tensor;
  }
  snprintf(symbol, sizeof(symbol), "__tvm_ffi_%s", name);
  TVMFFISafeCallType fn = (TVMFFISafeCallType)dlsym(kernels, symbol);
  int32_t status = 1;
  if (!fn) {
    snprintf(msg, sizeof(msg), "no kernel named %s in the library", name);
  } else {
    memset(&result, 0, sizeof(result));
    status = fn(NULL, packed, (int32_t)nargs, &result);
    if (status != 0) raised_message(msg, sizeof(msg));
  }
  uint32_t msg_len = (uint32_t)strlen(msg);
  write_exact(&status, 4);
  write_exact(&msg_len, 4);
  write_exact(msg, msg_len);
  for (uint32_t i = 0; i < nargs; ++i) {
    write_exact(args[i].data, args[i].nbytes);
    free(args[i].data);
  }
  fflush(stdout);
  return 1;
}

int main(int argc, char** argv) {
  if (argc != 4) die("usage", "kernel_host LIBTVM_FFI LIBTVM_RUNTIME KERNELS_SO");
  void* ffi = load(argv[1], RTLD_NOW | RTLD_GLOBAL);
  move_from_raised = (void (*)(TVMFFIObjectHandle*))dlsym(ffi, "TVMFFIErrorMoveFromRaised");
  dec_ref = (int (*)(TVMFFIObjectHandle))dlsym(ffi, "TVMFFIObjectDecRef");
  if (!move_from_raised || !dec_ref) die("not TVM's libtvm_ffi.so", argv[1]);
  void* runtime = load(argv[2], RTLD_NOW | RTLD_GLOBAL);
  void* kernels = load(argv[3], RTLD_NOW | RTLD_LOCAL);
  fill_slots(kernels, runtime);
  write_exact("RDY\n", 4);
  fflush(stdout);
  while (serve(kernels)) {
  }
  return 0;
}
