#include "libs/common/bounded_counts.h"

#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace medgate {
namespace {

TEST(BoundedCountsTest, TakesUpToTheBoundPerKeyAndGivesBackOnDestruction) {
  BoundedCounts<std::string> counts;
  std::vector<std::unique_ptr<BoundedCounts<std::string>::Slot>> held;
  for (int i = 0; i < 3; ++i) {
    held.push_back(counts.TryTake("a", 3));
    ASSERT_NE(held.back(), nullptr) << i;
  }
  EXPECT_EQ(counts.TryTake("a", 3), nullptr);
  EXPECT_EQ(counts.count("a"), 3);
  // Another key has its own count; a refusal takes nothing.
  auto b = counts.TryTake("b", 1);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(counts.TryTake("b", 1), nullptr);
  EXPECT_EQ(counts.count("b"), 1);
  EXPECT_EQ(counts.TryTake("c", 0), nullptr);
  EXPECT_EQ(counts.count("c"), 0);

  held.pop_back();
  EXPECT_EQ(counts.count("a"), 2);
  EXPECT_NE(counts.TryTake("a", 3), nullptr);  // taken and at once given back
  EXPECT_EQ(counts.count("a"), 2);
  held.clear();
  b.reset();
  EXPECT_EQ(counts.count("a"), 0);
  EXPECT_EQ(counts.count("b"), 0);
}

}  // namespace
}  // namespace medgate
