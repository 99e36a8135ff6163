// Checks csrc/nccl_api.h's declarations of NCCL's C ABI against a real nccl.h.
//
// Compiled, never run, by tests/test_nccl.py: `c++ -fsyntax-only` with the
// nvidia-nccl-cu13 wheel's include directory, CUDA's and csrc/. Every
// static_assert below compares one declaration of ours (namespace distlearn)
// with NCCL's own (global namespace): enumerator values, type sizes, the
// offsets and types of the ncclConfig_t prefix, and the full signature of
// every entry point the loader binds with dlsym (DL_NCCL_ENTRY_POINTS), so a wrong declaration
// fails to compile here instead of corrupting a call at run time.
#include <nccl.h>

#include <cstddef>
#include <type_traits>

#include "nccl_api.h"

namespace {

// Real<T>::type: T with each of our NCCL types replaced by NCCL's own, through
// pointers, const and function signatures.
template <typename T>
struct Real {
  using type = T;
};
template <typename T>
struct Real<T*> {
  using type = typename Real<T>::type*;
};
template <typename T>
struct Real<const T> {
  using type = const typename Real<T>::type;
};
template <typename R, typename... Args>
struct Real<R(Args...)> {
  using type = typename Real<R>::type(typename Real<Args>::type...);
};
template <>
struct Real<distlearn::ncclComm> {
  using type = ::ncclComm;
};
template <>
struct Real<distlearn::ncclUniqueId> {
  using type = ::ncclUniqueId;
};
template <>
struct Real<distlearn::ncclResult_t> {
  using type = ::ncclResult_t;
};
template <>
struct Real<distlearn::ncclDataType_t> {
  using type = ::ncclDataType_t;
};
template <>
struct Real<distlearn::ncclRedOp_t> {
  using type = ::ncclRedOp_t;
};
// The prefix stands for the whole struct in signatures; its layout is
// checked field by field below.
template <>
struct Real<distlearn::ncclConfigPrefix> {
  using type = ::ncclConfig_t;
};

template <typename Ours, typename Theirs>
constexpr bool same_after_mapping = std::is_same<typename Real<Ours>::type, Theirs>::value;

#define DL_SAME_VALUE(name) \
  static_assert(static_cast<long long>(distlearn::name) == static_cast<long long>(::name), #name)

// Versions: the declared ABI is NCCL 2.14.0, and this header is not older.
static_assert(NCCL_VERSION(2, 14, 0) == distlearn::kNcclAbiVersion, "kNcclAbiVersion");
static_assert(NCCL_VERSION_CODE >= distlearn::kNcclAbiVersion, "nccl.h older than the ABI");

// Handles and the unique id.
static_assert(std::is_same<Real<distlearn::ncclComm_t>::type, ::ncclComm_t>::value, "ncclComm_t");
static_assert(NCCL_UNIQUE_ID_BYTES == distlearn::kNcclUniqueIdBytes, "NCCL_UNIQUE_ID_BYTES");
static_assert(sizeof(distlearn::ncclUniqueId) == sizeof(::ncclUniqueId), "sizeof(ncclUniqueId)");
static_assert(alignof(distlearn::ncclUniqueId) == alignof(::ncclUniqueId), "alignof(ncclUniqueId)");

// Enums: size (how they are passed and stored) and every value we declare.
static_assert(sizeof(distlearn::ncclResult_t) == sizeof(::ncclResult_t), "sizeof(ncclResult_t)");
static_assert(sizeof(distlearn::ncclDataType_t) == sizeof(::ncclDataType_t),
              "sizeof(ncclDataType_t)");
static_assert(sizeof(distlearn::ncclRedOp_t) == sizeof(::ncclRedOp_t), "sizeof(ncclRedOp_t)");
DL_SAME_VALUE(ncclSuccess);
DL_SAME_VALUE(ncclUnhandledCudaError);
DL_SAME_VALUE(ncclSystemError);
DL_SAME_VALUE(ncclInternalError);
DL_SAME_VALUE(ncclInvalidArgument);
DL_SAME_VALUE(ncclInvalidUsage);
DL_SAME_VALUE(ncclRemoteError);
DL_SAME_VALUE(ncclInProgress);
DL_SAME_VALUE(ncclUint8);
DL_SAME_VALUE(ncclFloat16);
DL_SAME_VALUE(ncclFloat32);
DL_SAME_VALUE(ncclFloat64);
DL_SAME_VALUE(ncclBfloat16);
DL_SAME_VALUE(ncclSum);
static_assert(distlearn::kNcclShrinkDefault == NCCL_SHRINK_DEFAULT, "NCCL_SHRINK_DEFAULT");
static_assert(distlearn::kNcclShrinkAbort == NCCL_SHRINK_ABORT, "NCCL_SHRINK_ABORT");
static_assert(distlearn::kNcclRevokeDefault == NCCL_REVOKE_DEFAULT, "NCCL_REVOKE_DEFAULT");

// ncclConfig_t: our prefix is a prefix of NCCL's struct, field for field,
// and the magic is the one NCCL_CONFIG_INITIALIZER writes.
#define DL_SAME_FIELD(field)                                                                     \
  static_assert(offsetof(distlearn::ncclConfigPrefix, field) == offsetof(::ncclConfig_t, field), \
                "offset of ncclConfig_t." #field);                                               \
  static_assert(std::is_same<decltype(distlearn::ncclConfigPrefix::field),                       \
                             decltype(::ncclConfig_t::field)>::value,                            \
                "type of ncclConfig_t." #field)
DL_SAME_FIELD(size);
DL_SAME_FIELD(magic);
DL_SAME_FIELD(version);
DL_SAME_FIELD(blocking);
static_assert(sizeof(distlearn::ncclConfigPrefix) <= sizeof(::ncclConfig_t),
              "the prefix is longer than ncclConfig_t");
constexpr ::ncclConfig_t kInitialized = NCCL_CONFIG_INITIALIZER;
static_assert(kInitialized.magic == distlearn::kNcclConfigMagic, "NCCL_API_MAGIC");
static_assert(kInitialized.size == sizeof(::ncclConfig_t), "ncclConfig_t.size");

// Entry points: the type of each NcclApi member against NCCL's prototype
// of the symbol the loader binds to it.
#define DL_SAME_SIGNATURE(member, function)                                               \
  static_assert(                                                                          \
      same_after_mapping<std::remove_pointer<decltype(distlearn::NcclApi::member)>::type, \
                         std::remove_pointer<decltype(&::function)>::type>,               \
      "signature of " #function)
#define DL_SAME_ENTRY_POINT(member, symbol, required) DL_SAME_SIGNATURE(member, symbol);
DL_NCCL_ENTRY_POINTS(DL_SAME_ENTRY_POINT)

}  // namespace
