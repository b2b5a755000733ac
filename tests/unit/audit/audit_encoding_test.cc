// Unit tests of the audit chain's canonical encoding and hash.
#include <gtest/gtest.h>

#include "libs/audit/audit_log.h"

namespace medgate::audit {
namespace {

Entry Sample() {
  Entry e;
  e.actor = "spiffe://medgate.test/tenant/acme/app/backend";
  e.tenant = "acme";
  e.action = Action::kCreate;
  e.object_type = "patient";
  e.object_id = "p-1";
  e.patient_id = "p-1";
  e.decision = Decision::kPermit;
  e.reason = "placed";
  e.request_id = "r-1";
  e.origin = "ipv4:127.0.0.1:5000";
  return e;
}

TEST(AuditEncodingTest, EveryFieldChangesTheHash) {
  const std::string prev(32, '\0');
  const std::string base = ChainHash(prev, 1, 100, Sample());
  EXPECT_EQ(base.size(), 32u);
  EXPECT_EQ(base, ChainHash(prev, 1, 100, Sample()));  // deterministic
  EXPECT_NE(base, ChainHash(std::string(32, '\1'), 1, 100, Sample()));
  EXPECT_NE(base, ChainHash(prev, 2, 100, Sample()));
  EXPECT_NE(base, ChainHash(prev, 1, 101, Sample()));
  std::vector<void (*)(Entry&)> edits = {
      [](Entry& e) { e.actor += "x"; },       [](Entry& e) { e.tenant += "x"; },
      [](Entry& e) { e.action = Action::kRead; }, [](Entry& e) { e.object_type += "x"; },
      [](Entry& e) { e.object_id += "x"; },   [](Entry& e) { e.patient_id += "x"; },
      [](Entry& e) { e.decision = Decision::kDeny; }, [](Entry& e) { e.reason += "x"; },
      [](Entry& e) { e.request_id += "x"; },  [](Entry& e) { e.origin += "x"; },
      [](Entry& e) { e.purpose += "x"; },     [](Entry& e) { e.consent_id += "x"; },
      [](Entry& e) { e.consent_version += 1; }};
  for (size_t i = 0; i < edits.size(); ++i) {
    Entry e = Sample();
    edits[i](e);
    EXPECT_NE(base, ChainHash(prev, 1, 100, e)) << "edit " << i;
  }
}

TEST(AuditEncodingTest, FieldBoundariesAreUnambiguous) {
  // Moving a character from one field to the next must not produce the same encoding.
  Entry a = Sample();
  Entry b = Sample();
  a.object_type = "patientp";
  a.object_id = "-1";
  b.object_type = "patient";
  b.object_id = "p-1";
  EXPECT_NE(CanonicalEncoding(1, 1, a), CanonicalEncoding(1, 1, b));
}

TEST(AuditEncodingTest, EncodedPartsSurroundSeqAndTime) {
  // What the shard's audit_append() hashes: head || seq || at_us || tail, 8-byte big-endian.
  Entry e = Sample();
  e.consent_version = 7;
  const EncodedEntry parts = EncodeEntry(e);
  const std::string numbers("\x00\x00\x00\x00\x00\x00\x01\x02"
                            "\x00\x00\x01\x02\x03\x04\x05\x06",
                            16);
  EXPECT_EQ(parts.head + numbers + parts.tail,
            CanonicalEncoding(0x0102, 0x010203040506, e));
}

}  // namespace
}  // namespace medgate::audit
