// Seeded rounds for the property tests that feed damaged or hostile bytes to a parser ("fuzz"
// tests run as ordinary unit tests): every round is repeatable from the seed and round number the
// failure message names. MEDGATE_FUZZ_SEED sets the seed and MEDGATE_FUZZ_ROUNDS the number of
// rounds (for a longer search by hand: CI runs each test's default).
#ifndef MEDGATE_TESTS_SUPPORT_FUZZ_H_
#define MEDGATE_TESTS_SUPPORT_FUZZ_H_

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace medgate::testing {

// A variable that is set but not a number the test can use stops the run and says so, rather
// than running the default rounds as if asked.
[[noreturn]] inline void FuzzBadVariable(const char* name, const char* value, const char* want) {
  std::fprintf(stderr, "%s='%s' is not %s\n", name, value, want);
  std::exit(2);
}

inline uint64_t FuzzSeed() {
  uint64_t seed = 20261203;
  if (const char* env = std::getenv("MEDGATE_FUZZ_SEED")) {
    if (!absl::SimpleAtoi(env, &seed)) FuzzBadVariable("MEDGATE_FUZZ_SEED", env, "a seed (0-2^64)");
  }
  return seed;
}

inline int FuzzRounds(int default_rounds) {
  int rounds = default_rounds;
  if (const char* env = std::getenv("MEDGATE_FUZZ_ROUNDS")) {
    if (!absl::SimpleAtoi(env, &rounds) || rounds < 1) {
      FuzzBadVariable("MEDGATE_FUZZ_ROUNDS", env, "a number of rounds, 1 or more");
    }
  }
  return rounds;
}

// The generator of one round: the same seed and round give the same bytes.
inline std::mt19937_64 FuzzRng(uint64_t seed, int round) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(round)};
  return std::mt19937_64(seq);
}

// What a failure message says to replay the round.
inline std::string FuzzReplay(uint64_t seed, int round) {
  return absl::StrCat("round ", round, " (replay: MEDGATE_FUZZ_SEED=", seed,
                      " MEDGATE_FUZZ_ROUNDS=", round + 1, ")");
}

// A number in [lo, hi].
inline uint64_t Uniform(std::mt19937_64& rng, uint64_t lo, uint64_t hi) {
  return std::uniform_int_distribution<uint64_t>(lo, hi)(rng);
}

}  // namespace medgate::testing

#endif  // MEDGATE_TESTS_SUPPORT_FUZZ_H_
