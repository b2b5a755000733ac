// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status code (Abseil 20220623 ships neither).
#ifndef MEDGATE_LIBS_COMMON_STATUS_MACROS_H_
#define MEDGATE_LIBS_COMMON_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MEDGATE_STATUS_CONCAT_INNER_(a, b) a##b
#define MEDGATE_STATUS_CONCAT_(a, b) MEDGATE_STATUS_CONCAT_INNER_(a, b)

// Returns from the current function with the status of `expr` when it is not OK.
#define RETURN_IF_ERROR(expr)                                   \
  do {                                                          \
    if (absl::Status medgate_status_ = (expr); !medgate_status_.ok()) { \
      return medgate_status_;                                   \
    }                                                           \
  } while (false)

// ASSIGN_OR_RETURN(auto x, MakeX()); binds the value of a StatusOr or returns its status.
#define ASSIGN_OR_RETURN(lhs, expr)                                          \
  MEDGATE_ASSIGN_OR_RETURN_IMPL_(                                            \
      MEDGATE_STATUS_CONCAT_(medgate_statusor_, __LINE__), lhs, expr)

#define MEDGATE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                   \
  if (!statusor.ok()) {                                     \
    return std::move(statusor).status();                    \
  }                                                         \
  lhs = std::move(statusor).value()

#endif  // MEDGATE_LIBS_COMMON_STATUS_MACROS_H_
