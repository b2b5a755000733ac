// Unit tests of how the Audit service presents stored entries: reason codes and chain faults.
#include <gtest/gtest.h>

#include "services/sharing/audit_core.h"

namespace medgate::sharing {
namespace {

TEST(SplitReasonTest, SeparatesTheCodeFromTheDetail) {
  using P = std::pair<std::string, std::string>;
  EXPECT_EQ(SplitReason("PERMITTED"), P("PERMITTED", ""));
  EXPECT_EQ(SplitReason("PERMITTED: bytes=12"), P("PERMITTED", "bytes=12"));
  EXPECT_EQ(SplitReason("GRANT_REVOKED: grant=fr-1.g1"), P("GRANT_REVOKED", "grant=fr-1.g1"));
  EXPECT_EQ(SplitReason("BREAK_GLASS:no space"), P("BREAK_GLASS", "no space"));
  // Free text written by services that predate codes is all detail.
  EXPECT_EQ(SplitReason("tenant created"), P("", "tenant created"));
  EXPECT_EQ(SplitReason("placed in fr-1"), P("", "placed in fr-1"));
  EXPECT_EQ(SplitReason("REVOKED by ops"), P("", "REVOKED by ops"));
  EXPECT_EQ(SplitReason("9LIVES: x"), P("", "9LIVES: x"));
  EXPECT_EQ(SplitReason(""), P("", ""));
  EXPECT_EQ(SplitReason(std::string(65, 'A')), P("", std::string(65, 'A')));
}

TEST(FaultOfTest, NamesWhatLibsAuditReports) {
  auto fault = [](int64_t seq, audit::ChainFault f) {
    audit::VerifyResult r;
    r.ok = f == audit::ChainFault::kNone;
    r.fault = f;
    r.first_bad_seq = r.ok ? 0 : seq;
    return FaultOf(r);
  };
  EXPECT_EQ(fault(0, audit::ChainFault::kNone), ChainFault::kNone);
  EXPECT_EQ(fault(7, audit::ChainFault::kMissing), ChainFault::kSeqGap);
  EXPECT_EQ(fault(9, audit::ChainFault::kHeadBehind), ChainFault::kSeqGap);
  EXPECT_EQ(fault(8, audit::ChainFault::kHeadHash), ChainFault::kHashMismatch);
  EXPECT_EQ(fault(1, audit::ChainFault::kPrevHash), ChainFault::kBadGenesis);
  EXPECT_EQ(fault(4, audit::ChainFault::kPrevHash), ChainFault::kPrevHashMismatch);
  EXPECT_EQ(fault(4, audit::ChainFault::kAltered), ChainFault::kHashMismatch);
  EXPECT_EQ(fault(4, audit::ChainFault::kMalformed), ChainFault::kMalformed);
  EXPECT_EQ(fault(18, audit::ChainFault::kPastHead), ChainFault::kPastHead);
}

}  // namespace
}  // namespace medgate::sharing
