// Unit tests of the turns that keep one stream of a device storing at a time.
#include "services/ingest/device_turns.h"

#include <vector>

#include <gtest/gtest.h>

namespace medgate::ingest {
namespace {

using Turn = std::shared_ptr<DeviceTurns::Turn>;

// What happened to one stream.
struct Observed {
  bool superseded = false;
  Turn started;  // the turn `start` handed over
  int starts = 0;
};

DeviceTurns::Stream Watch(Observed& o) {
  return {[&o] { o.superseded = true; },
          [&o](Turn turn) {
            ++o.starts;
            o.started = std::move(turn);
          }};
}

TEST(DeviceTurnsTest, TheFirstStreamOfADeviceHoldsItsTurnAtOnce) {
  DeviceTurns turns;
  Observed a;
  Turn turn = turns.Open("dev-a", Watch(a));
  ASSERT_NE(turn, nullptr);
  EXPECT_EQ(a.starts, 0);
  EXPECT_FALSE(a.superseded);
  // Another device is independent.
  Observed b;
  EXPECT_NE(turns.Open("dev-b", Watch(b)), nullptr);
  EXPECT_FALSE(a.superseded);
  EXPECT_EQ(turns.devices(), 1u);  // dev-b's turn was dropped at once
  turn.reset();
  EXPECT_EQ(turns.devices(), 0u);
}

TEST(DeviceTurnsTest, ANewStreamSupersedesTheHolderAndStartsOnlyWhenEveryCopyOfItsTurnIsGone) {
  DeviceTurns turns;
  Observed a;
  Observed b;
  Turn held_by_a = turns.Open("dev", Watch(a));
  ASSERT_NE(held_by_a, nullptr);
  Turn held_by_batch = held_by_a;  // a batch of A still with the writer
  EXPECT_EQ(turns.Open("dev", Watch(b)), nullptr);
  EXPECT_TRUE(a.superseded);
  EXPECT_FALSE(b.superseded);
  held_by_a.reset();  // A reads no more
  EXPECT_EQ(b.starts, 0) << "B started while a batch of A was unanswered";
  held_by_batch.reset();  // that batch is answered
  EXPECT_EQ(b.starts, 1);
  ASSERT_NE(b.started, nullptr);
  EXPECT_EQ(turns.devices(), 1u);
  b.started.reset();
  EXPECT_EQ(turns.devices(), 0u);
}

TEST(DeviceTurnsTest, AWaitingStreamPassedOverByANewerOneNeverStarts) {
  DeviceTurns turns;
  Observed a;
  Observed b;
  Observed c;
  Turn held_by_a = turns.Open("dev", Watch(a));
  EXPECT_EQ(turns.Open("dev", Watch(b)), nullptr);
  EXPECT_EQ(turns.Open("dev", Watch(c)), nullptr);
  EXPECT_TRUE(b.superseded);
  EXPECT_FALSE(c.superseded);
  held_by_a.reset();
  EXPECT_EQ(b.starts, 0);
  EXPECT_EQ(c.starts, 1);
  // C holds the turn now: the next stream supersedes C, not A or B again.
  a.superseded = false;
  b.superseded = false;
  Observed d;
  EXPECT_EQ(turns.Open("dev", Watch(d)), nullptr);
  EXPECT_TRUE(c.superseded);
  EXPECT_FALSE(a.superseded);
  EXPECT_FALSE(b.superseded);
  c.started.reset();
  EXPECT_EQ(d.starts, 1);
}

TEST(DeviceTurnsTest, AStreamThatDropsTheTurnItIsHandedPassesItOn) {
  DeviceTurns turns;
  Observed a;
  Observed c;
  int b_starts = 0;
  Turn held_by_a = turns.Open("dev", Watch(a));
  // B is gone by the time its turn comes (its client cancelled): it drops the turn at once.
  EXPECT_EQ(turns.Open("dev", {[] {}, [&b_starts](Turn) { ++b_starts; }}), nullptr);
  held_by_a.reset();
  EXPECT_EQ(b_starts, 1);
  EXPECT_EQ(turns.devices(), 0u);
  // The device's next stream holds the turn at once.
  EXPECT_NE(turns.Open("dev", Watch(c)), nullptr);
}

TEST(DeviceTurnsTest, ATurnMayOutliveTheTurnsThatGaveIt) {
  Observed a;
  Observed b;
  Turn held;
  {
    DeviceTurns turns;
    held = turns.Open("dev", Watch(a));
    EXPECT_EQ(turns.Open("dev", Watch(b)), nullptr);
  }
  held.reset();  // a batch answered after the service is gone: B is still handed the turn
  EXPECT_EQ(b.starts, 1);
  b.started.reset();
}

}  // namespace
}  // namespace medgate::ingest
