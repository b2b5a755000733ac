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

TEST(FaultFromProblemTest, NamesWhatLibsAuditReports) {
  EXPECT_EQ(FaultFromProblem(7, "entry 7 is missing"), ChainFault::kSeqGap);
  EXPECT_EQ(FaultFromProblem(9,
                             "chain head says entry 9 is last but the log ends at 8 "
                             "(entries removed or head altered)"),
            ChainFault::kSeqGap);
  EXPECT_EQ(FaultFromProblem(8,
                             "the chain head's hash is not entry 8's (the entry rewritten with its "
                             "hash recomputed, or the head altered)"),
            ChainFault::kHashMismatch);
  EXPECT_EQ(FaultFromProblem(1, "prev_hash does not match the previous entry's hash"),
            ChainFault::kBadGenesis);
  EXPECT_EQ(FaultFromProblem(4, "prev_hash does not match the previous entry's hash"),
            ChainFault::kPrevHashMismatch);
  EXPECT_EQ(FaultFromProblem(4, "content does not match its hash (entry altered)"),
            ChainFault::kHashMismatch);
  EXPECT_EQ(FaultFromProblem(4, "unknown audit action 'frobnicate'"), ChainFault::kMalformed);
  EXPECT_EQ(FaultFromProblem(18,
                             "entries 18 to 20 follow entry 17, the last by the chain head "
                             "(appended without moving the head, or the head moved back)"),
            ChainFault::kPastHead);
}

}  // namespace
}  // namespace medgate::sharing
