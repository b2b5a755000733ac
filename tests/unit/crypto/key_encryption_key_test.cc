// Unit tests of key wrapping under a local key-encryption key, and of loading the KEK.
#include "libs/crypto/key_encryption_key.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/escaping.h"

namespace medgate::crypto {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

const char kKekHex[] = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

std::unique_ptr<KeyEncryptionKey> Kek(const std::string& hex = kKekHex) {
  auto kek = ParseHexKeyEncryptionKey(hex, "test");
  EXPECT_TRUE(kek.ok()) << kek.status();
  return *std::move(kek);
}

TEST(KeyEncryptionKeyTest, WrapsAndUnwrapsInItsContext) {
  auto kek = Kek();
  SecretKey data_key = SecretKey::Random();
  auto wrapped = kek->Wrap(data_key, "patient:pt_1");
  ASSERT_TRUE(wrapped.ok());
  EXPECT_EQ(wrapped->find(std::string(data_key.bytes())), std::string::npos);
  auto unwrapped = kek->Unwrap(*wrapped, "patient:pt_1");
  ASSERT_TRUE(unwrapped.ok()) << unwrapped.status();
  EXPECT_EQ(unwrapped->bytes(), data_key.bytes());
  // Another owner's context does not unwrap it.
  EXPECT_EQ(kek->Unwrap(*wrapped, "patient:pt_2").status().code(), absl::StatusCode::kDataLoss);
}

TEST(KeyEncryptionKeyTest, WrongKekIsDataLossNamingTheKek) {
  auto kek = Kek();
  auto other = Kek(std::string(64, 'f'));
  EXPECT_NE(kek->id(), other->id());
  auto wrapped = kek->Wrap(SecretKey::Random(), "c");
  ASSERT_TRUE(wrapped.ok());
  auto unwrapped = other->Unwrap(*wrapped, "c");
  EXPECT_EQ(unwrapped.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(unwrapped.status().message()), HasSubstr(other->id()));
  std::string altered = *wrapped;
  altered.back() = static_cast<char>(altered.back() ^ 1);
  EXPECT_EQ(kek->Unwrap(altered, "c").status().code(), absl::StatusCode::kDataLoss);
}

TEST(KeyEncryptionKeyTest, IdIsStableAndRevealsNoKeyBytes) {
  EXPECT_EQ(Kek()->id(), Kek()->id());
  EXPECT_THAT(Kek()->id(), Not(HasSubstr("000102")));
  EXPECT_EQ(Kek()->id().rfind("local-", 0), 0u);
}

TEST(KeyEncryptionKeyTest, RefusesMalformedKeysWithoutEchoingThem) {
  for (const std::string& bad :
       {std::string(""), std::string(63, 'a'), std::string(65, 'a'), std::string(62, 'a') + "zz"}) {
    auto kek = ParseHexKeyEncryptionKey(bad, "sharing.kek_env");
    EXPECT_EQ(kek.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(kek.status().message()), HasSubstr("sharing.kek_env"));
    if (!bad.empty()) {
      EXPECT_THAT(std::string(kek.status().message()), Not(HasSubstr(bad)));
    }
  }
}

TEST(KeyEncryptionKeyTest, LoadsFromFileAndEnvironment) {
  const std::string path =
      std::filesystem::temp_directory_path() / ("medgate-kek-test-" + std::to_string(getpid()));
  {
    std::ofstream out(path);
    out << kKekHex << "\n";
  }
  std::filesystem::permissions(path, std::filesystem::perms::owner_read |
                                         std::filesystem::perms::owner_write);
  auto from_file = LoadKeyEncryptionKeyFile(path);
  ASSERT_TRUE(from_file.ok()) << from_file.status();
  EXPECT_EQ((*from_file)->id(), Kek()->id());
  // Open to its group or others: refused, not loaded (others could read the key that unwraps
  // every patient key, or swap in theirs).
  using std::filesystem::perms;
  for (perms open : {perms::others_read, perms::group_read, perms::group_write,
                     perms::others_write}) {
    std::filesystem::permissions(path, perms::owner_read | open);
    absl::Status refused = LoadKeyEncryptionKeyFile(path).status();
    EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition) << refused;
    EXPECT_THAT(std::string(refused.message()), HasSubstr("readable by its owner only"));
    EXPECT_THAT(std::string(refused.message()), Not(HasSubstr(kKekHex)));
  }
  std::filesystem::permissions(path, perms::owner_read);
  ASSERT_TRUE(LoadKeyEncryptionKeyFile(path).ok());
  std::filesystem::permissions(path, perms::owner_read | perms::owner_write);
  // A file far longer than a key is refused without echoing it.
  {
    std::ofstream out(path, std::ios::app);
    out << std::string(2000, ' ');
  }
  absl::Status too_long = LoadKeyEncryptionKeyFile(path).status();
  EXPECT_EQ(too_long.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_long.message()), ::testing::Not(::testing::HasSubstr(kKekHex)));
  std::filesystem::remove(path);
  EXPECT_EQ(LoadKeyEncryptionKeyFile(path).status().code(), absl::StatusCode::kNotFound);

  // The variable's bytes are the environment's own (putenv), as a process's initial ones are.
  std::string variable = std::string("MEDGATE_TEST_KEK=") + kKekHex;
  std::string bad = "MEDGATE_TEST_KEK=0123456789abcdef";
  // Declared after the buffers: whatever happens below, the environment names neither once they
  // are gone.
  absl::Cleanup forget = [] { ::unsetenv("MEDGATE_TEST_KEK"); };
  ASSERT_EQ(::putenv(variable.data()), 0);
  auto from_env = LoadKeyEncryptionKeyEnv("MEDGATE_TEST_KEK");
  ASSERT_TRUE(from_env.ok()) << from_env.status();
  EXPECT_EQ((*from_env)->id(), Kek()->id());
  // Keys wrapped under one load unwrap under the other: same KEK.
  auto wrapped = (*from_file)->Wrap(SecretKey::Random(), "x");
  ASSERT_TRUE(wrapped.ok());
  EXPECT_TRUE((*from_env)->Unwrap(*wrapped, "x").ok());
  // Read once: wiped where the environment held it, and the variable gone (no child inherits it).
  EXPECT_EQ(std::getenv("MEDGATE_TEST_KEK"), nullptr);
  EXPECT_EQ(variable.find(kKekHex), std::string::npos);
  EXPECT_EQ(variable.substr(std::strlen("MEDGATE_TEST_KEK=")),
            std::string(std::strlen(kKekHex), '\0'));
  EXPECT_EQ(LoadKeyEncryptionKeyEnv("MEDGATE_TEST_KEK").status().code(),
            absl::StatusCode::kNotFound);
  // A value that is not a key is wiped too, and not echoed.
  ASSERT_EQ(::putenv(bad.data()), 0);
  absl::Status refused = LoadKeyEncryptionKeyEnv("MEDGATE_TEST_KEK").status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.message()), ::testing::Not(::testing::HasSubstr("0123456789")));
  EXPECT_EQ(std::getenv("MEDGATE_TEST_KEK"), nullptr);
  EXPECT_EQ(bad.find("0123456789abcdef"), std::string::npos);
}

// A KEK path that names something other than a regular file is refused at once: a FIFO would
// hold the service's start in open() until another process wrote to it.
TEST(KeyEncryptionKeyTest, APathThatIsNotAFileIsRefusedWithoutWaiting) {
  char dir_template[] = "/tmp/medgate-kek-fifo-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  absl::Cleanup remove_dir = [&] { std::filesystem::remove_all(dir); };
  const std::string fifo = dir + "/kek.hex";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  // Run apart, so that a loader stuck in open() fails this test instead of hanging it: a writer
  // opened afterwards lets it go.
  std::future<absl::Status> loaded = std::async(std::launch::async, [&] {
    return LoadKeyEncryptionKeyFile(fifo).status();
  });
  if (loaded.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    ADD_FAILURE() << "loading a FIFO as the KEK blocked";
    const int writer = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    if (writer >= 0) ::close(writer);
  }
  absl::Status status = loaded.get();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("not a regular file"));
  // A directory neither.
  EXPECT_EQ(LoadKeyEncryptionKeyFile(dir).status().code(), absl::StatusCode::kFailedPrecondition);
}

// A key file owned by another account is that account's to swap, whatever its mode.
TEST(KeyEncryptionKeyTest, AFileOwnedByAnotherAccountIsRefused) {
  char dir_template[] = "/tmp/medgate-kek-owner-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  absl::Cleanup remove_dir = [&] { std::filesystem::remove_all(dir); };
  const std::string path = dir + "/kek.hex";
  {
    std::ofstream out(path);
    out << kKekHex << "\n";
  }
  ASSERT_EQ(::chmod(path.c_str(), 0600), 0);
  ASSERT_TRUE(LoadKeyEncryptionKeyFile(path).ok());
  // Giving a file away takes root (CI runs as root, as scripts/test does): as another user this
  // part cannot be set up, and the test fails rather than pass without checking it.
  ASSERT_EQ(::geteuid(), 0u) << "giving the file to another account needs root: run as root";
  ASSERT_EQ(::chown(path.c_str(), 65534, 65534), 0) << std::strerror(errno);
  absl::Status status = LoadKeyEncryptionKeyFile(path).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("owned by uid 65534"));
  EXPECT_THAT(std::string(status.message()), Not(HasSubstr(kKekHex)));
}

}  // namespace
}  // namespace medgate::crypto
