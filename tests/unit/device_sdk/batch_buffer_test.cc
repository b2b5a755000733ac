// Unit tests of the device SDK's durable batch buffer.
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "absl/cleanup/cleanup.h"
#include "libs/crypto/sha256.h"
#include "libs/device_sdk/batch_buffer.h"

namespace medgate::device {
namespace {

class BatchBufferTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = (std::filesystem::temp_directory_path() /
             ("medgate-buffer-" + std::to_string(getpid()) + "-" +
              ::testing::UnitTest::GetInstance()->current_test_info()->name()))
                .string();
    std::filesystem::remove(path_);
  }
  void TearDown() override {
    std::filesystem::remove(path_);
    std::filesystem::remove(path_ + ".lock");
  }

  // An empty directory next to the test's file, which every user may enter and write (tests
  // that drop privileges take its rights away themselves); the caller removes it.
  std::string NewDirectory() const {
    const std::string dir = path_ + ".dir";
    std::filesystem::remove_all(dir);
    std::filesystem::create_directory(dir);
    std::filesystem::permissions(dir, std::filesystem::perms::all);
    return dir;
  }

  static v1::VitalsBatch Samples(int n) {
    v1::VitalsBatch b;
    for (int i = 0; i < n; ++i) b.add_samples()->set_loinc_code("8867-4");
    return b;
  }

  static std::string Bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }

  // Each pending batch as its batch_seq, then its samples' seqs.
  static std::vector<std::vector<uint64_t>> Seqs(const std::deque<v1::VitalsBatch>& pending) {
    std::vector<std::vector<uint64_t>> out;
    for (const v1::VitalsBatch& b : pending) {
      out.push_back({b.batch_seq()});
      for (const v1::VitalSample& s : b.samples()) out.back().push_back(s.seq());
    }
    return out;
  }

  // Expects `status` to be an error that names `path` and the system's reason `error`.
  static void ExpectNamesPathAndReason(const absl::Status& status, const std::string& path,
                                       int error) {
    EXPECT_FALSE(status.ok());
    EXPECT_NE(status.message().find("'" + path + "'"), absl::string_view::npos) << status;
    EXPECT_NE(status.message().find(std::strerror(error)), absl::string_view::npos) << status;
  }

  std::string path_;
};

// Root opens any file whatever its mode: for a file the device's user cannot read, a test run as
// root opens the buffer as nobody. Restores the effective user when it goes out of scope.
class UnprivilegedScope {
 public:
  UnprivilegedScope() {
    if (geteuid() == 0) switched_ = seteuid(kNobody) == 0;
  }
  ~UnprivilegedScope() {
    if (switched_) seteuid(0);
  }
  // False when the test runs as root and could not give it up.
  bool ok() const { return geteuid() != 0; }

 private:
  static constexpr uid_t kNobody = 65534;
  bool switched_ = false;
};

// The buffer holds patients' vitals: its files are its owner's alone whatever the umask, and a
// link planted where it writes its rewrite is removed, never written through.
TEST_F(BatchBufferTest, FilesAreTheOwnersAloneAndNoLinkIsFollowed) {
  const mode_t umask_before = umask(022);
  absl::Cleanup restore_umask = [umask_before] { umask(umask_before); };
  const std::string target = path_ + ".target";
  {
    std::ofstream out(target);
    out << "not the buffer's";
  }
  std::filesystem::create_symlink(target, path_ + ".tmp");
  auto mode_of = [](const std::string& path) {
    struct stat st {};
    EXPECT_EQ(lstat(path.c_str(), &st), 0) << path << ": " << std::strerror(errno);
    return st.st_mode & 0777;
  };
  {
    auto buffer = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_TRUE((*buffer)->Seal(Samples(2)).ok());
  }
  EXPECT_EQ(Bytes(target), "not the buffer's");
  EXPECT_FALSE(std::filesystem::is_symlink(path_));
  EXPECT_EQ(mode_of(path_), 0600u);
  EXPECT_EQ(mode_of(path_ + ".lock"), 0600u);
  // A damaged file's copy kept aside holds the same data: the owner's alone too.
  std::string damaged = Bytes(path_);
  damaged[4] = 0x7f;  // the first record's type: one the buffer never writes
  {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out << damaged;
  }
  std::filesystem::permissions(path_, std::filesystem::perms::owner_read |
                                          std::filesystem::perms::owner_write |
                                          std::filesystem::perms::others_read);
  {
    auto buffer = BatchBuffer::Open(path_, 100, /*first_seq=*/1000);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_FALSE((*buffer)->damaged_copy().empty());
    EXPECT_EQ(Bytes((*buffer)->damaged_copy()), damaged);
    EXPECT_EQ(mode_of((*buffer)->damaged_copy()), 0600u);
    EXPECT_EQ(mode_of(path_), 0600u);  // the rewritten buffer
    std::filesystem::remove((*buffer)->damaged_copy());
  }
  std::filesystem::remove(target);
}

TEST_F(BatchBufferTest, AssignsSeqsAndKeepsUnackedBatchesAcrossRestarts) {
  {
    auto buffer = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    EXPECT_EQ(*(*buffer)->Seal(Samples(3)), 1u);
    EXPECT_EQ(*(*buffer)->Seal(Samples(2)), 2u);
    EXPECT_EQ(*(*buffer)->Seal(Samples(1)), 3u);
    ASSERT_TRUE((*buffer)->Ack(2).ok());
    EXPECT_EQ((*buffer)->pending().size(), 2u);
  }
  auto reopened = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(reopened.ok());
  const auto& pending = (*reopened)->pending();
  ASSERT_EQ(pending.size(), 2u);
  EXPECT_EQ(pending[0].batch_seq(), 1u);
  EXPECT_EQ(pending[0].samples(0).seq(), 1u);
  EXPECT_EQ(pending[0].samples(2).seq(), 3u);
  EXPECT_EQ(pending[1].batch_seq(), 3u);
  EXPECT_EQ(pending[1].samples(0).seq(), 6u);
  // Numbering continues where it stopped, even once everything was acked and compacted.
  ASSERT_TRUE((*reopened)->Ack(1).ok());
  ASSERT_TRUE((*reopened)->Ack(3).ok());
  reopened->reset();
  auto again = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE((*again)->pending().empty());
  EXPECT_EQ(*(*again)->Seal(Samples(1)), 4u);
  EXPECT_EQ((*again)->pending()[0].samples(0).seq(), 7u);
}

// A batch sealed with a string that is not UTF-8 (before DeviceClient::Send checked them) is
// whole in the file but does not parse: reopened, it is dropped and counted, not taken for damage.
// The batches after it are kept, no copy is set aside, and its seqs are not given out again.
TEST_F(BatchBufferTest, AWholeBatchThatDoesNotParseIsDroppedAndTheRestKept) {
  {
    auto buffer = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_EQ(*(*buffer)->Seal(Samples(2)), 1u);
    v1::VitalsBatch latin1 = Samples(3);
    latin1.mutable_samples(1)->set_ucum_unit("\xb5g");  // "µg" in Latin-1
    ASSERT_EQ(*(*buffer)->Seal(latin1), 2u);
    ASSERT_EQ(*(*buffer)->Seal(Samples(1)), 3u);
  }
  {
    auto reopened = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(reopened.ok()) << reopened.status();
    EXPECT_EQ((*reopened)->unreadable_batches(), 1u);
    EXPECT_EQ((*reopened)->damaged_copy(), "");
    EXPECT_EQ(Seqs((*reopened)->pending()),
              (std::vector<std::vector<uint64_t>>{{1, 1, 2}, {3, 6}}));
    EXPECT_EQ(*(*reopened)->Seal(Samples(1)), 4u);
    EXPECT_EQ((*reopened)->pending().back().samples(0).seq(), 7u);
  }
  // Gone from the file once it was compacted: the next opening finds nothing unreadable.
  auto again = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->unreadable_batches(), 0u);
  EXPECT_EQ(Seqs((*again)->pending()),
            (std::vector<std::vector<uint64_t>>{{1, 1, 2}, {3, 6}, {4, 7}}));
}

// A batch record whose sums match but whose bytes are not even protobuf's wire format (only a
// fault in the writer could make one) is damage: its seqs cannot be read, so the file is kept
// aside and the batches before it kept, as for any damage; it is not dropped as unreadable.
TEST_F(BatchBufferTest, AWholeRecordThatIsNoWireFormatIsDamageNotAnUnreadableBatch) {
  {
    auto buffer = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(buffer.ok());
    for (int i = 0; i < 3; ++i) ASSERT_TRUE((*buffer)->Seal(Samples(2)).ok());
  }
  std::string file;
  {
    std::ifstream in(path_, std::ios::binary);
    file.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  // Records: [u32 length][u8 type][u32 header sum][u32 payload sum][payload]; the counters first.
  const auto length_at = [&](size_t at) {
    uint32_t n = 0;
    for (size_t i = 0; i < 4; ++i) n = (n << 8) | static_cast<unsigned char>(file[at + i]);
    return n;
  };
  const size_t first_batch = 13 + length_at(0);
  const size_t second_batch = first_batch + 13 + length_at(first_batch);
  const uint32_t length = length_at(second_batch);
  ASSERT_LT(length, 127u);
  // batch_seq 2, then a samples field whose length (127) runs past the end of the record.
  std::string payload = std::string("\x08\x02\x12\x7f", 4);
  payload.resize(length, 'x');
  const std::string sum = crypto::Sha256::Of(payload).substr(0, 4);
  file.replace(second_batch + 9, 4, sum);
  file.replace(second_batch + 13, length, payload);
  {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out << file;
  }
  auto buffer = BatchBuffer::Open(path_, 100, /*first_seq=*/1000);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  EXPECT_EQ((*buffer)->unreadable_batches(), 0u);
  ASSERT_EQ((*buffer)->pending().size(), 1u);
  EXPECT_EQ((*buffer)->pending()[0].batch_seq(), 1u);
  EXPECT_EQ((*buffer)->next_seq(), 1000u);
  ASSERT_FALSE((*buffer)->damaged_copy().empty());
  std::filesystem::remove((*buffer)->damaged_copy());
}

// After a lost buffer file the server holds seqs this buffer never gave out: its pending batches
// are renumbered above them, the samples an ack took for duplicates are sealed again as a new
// batch, and all of it survives a restart.
TEST_F(BatchBufferTest, RestartsItsSeqsAboveWhatTheServerHolds) {
  {
    auto buffer = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_EQ(*(*buffer)->Seal(Samples(3)), 1u);  // seqs 1-3
    ASSERT_EQ(*(*buffer)->Seal(Samples(2)), 2u);  // seqs 4-5
    std::vector<v1::VitalSample> unstored(2);
    unstored[0].set_loinc_code("8867-4");
    unstored[1].set_loinc_code("59408-5");
    ASSERT_TRUE((*buffer)->RestartSeqsAbove(/*acked_batch_seq=*/1, 100, std::move(unstored)).ok());
    EXPECT_EQ((*buffer)->next_seq(), 105u);
  }
  auto buffer = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  const auto& pending = (*buffer)->pending();
  ASSERT_EQ(pending.size(), 2u);
  EXPECT_EQ(pending[0].batch_seq(), 2u);
  ASSERT_EQ(pending[0].samples_size(), 2);
  EXPECT_EQ(pending[0].samples(0).seq(), 101u);
  EXPECT_EQ(pending[0].samples(1).seq(), 102u);
  EXPECT_EQ(pending[1].batch_seq(), 3u);
  ASSERT_EQ(pending[1].samples_size(), 2);
  EXPECT_EQ(pending[1].samples(0).seq(), 103u);
  EXPECT_EQ(pending[1].samples(1).loinc_code(), "59408-5");
  EXPECT_EQ(pending[1].samples(1).seq(), 104u);
  EXPECT_EQ(*(*buffer)->Seal(Samples(1)), 4u);
  EXPECT_EQ((*buffer)->pending().back().samples(0).seq(), 105u);
}

// A restart whose rewrite fails (or a crash before it) leaves the file as it was: the acked batch
// whose samples were taken for duplicates is still in it, to be sent again, not lost.
TEST_F(BatchBufferTest, AFailedRestartKeepsTheBatchItWouldReplace) {
  {
    auto buffer = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_EQ(*(*buffer)->Seal(Samples(3)), 1u);
    std::filesystem::create_directory(path_ + ".tmp");  // the rewrite cannot create its file
    std::vector<v1::VitalSample> unstored(3);
    EXPECT_FALSE((*buffer)->RestartSeqsAbove(/*acked_batch_seq=*/1, 100, std::move(unstored)).ok());
    std::filesystem::remove(path_ + ".tmp");
  }
  auto reopened = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  ASSERT_EQ((*reopened)->pending().size(), 1u);
  EXPECT_EQ((*reopened)->pending()[0].batch_seq(), 1u);
  EXPECT_EQ((*reopened)->pending()[0].samples_size(), 3);
}

// A restart whose rewrite fails leaves memory as it was too, so it matches the file: the buffer
// goes on sending what a restart of the device process would find. Memory that had moved on would
// send the acked batch's samples under new seqs, and after a restart the file would send them
// again under their old ones: stored twice.
TEST_F(BatchBufferTest, AFailedRestartLeavesMemoryAsTheFileHasIt) {
  auto buffer = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  // Every sample told apart by its value.
  v1::VitalsBatch first = Samples(3);
  v1::VitalsBatch second = Samples(2);
  for (int i = 0; i < 3; ++i) first.mutable_samples(i)->set_value(i);
  for (int i = 0; i < 2; ++i) second.mutable_samples(i)->set_value(10 + i);
  ASSERT_EQ(*(*buffer)->Seal(first), 1u);   // seqs 1-3
  ASSERT_EQ(*(*buffer)->Seal(second), 2u);  // seqs 4-5
  const std::vector<std::vector<uint64_t>> before = Seqs((*buffer)->pending());
  const uint64_t next_seq_before = (*buffer)->next_seq();
  std::vector<v1::VitalSample> unstored((*buffer)->pending()[0].samples().begin(),
                                        (*buffer)->pending()[0].samples().end());
  std::filesystem::create_directory(path_ + ".tmp");  // the rewrite cannot create its file
  EXPECT_FALSE((*buffer)->RestartSeqsAbove(/*acked_batch_seq=*/1, 100, std::move(unstored)).ok());
  std::filesystem::remove(path_ + ".tmp");
  EXPECT_EQ(Seqs((*buffer)->pending()), before);
  EXPECT_EQ((*buffer)->next_seq(), next_seq_before);

  // What a restart of the device process would find (the file is this buffer's while it lives).
  const std::string restarted = path_ + ".restarted";
  std::filesystem::copy_file(path_, restarted, std::filesystem::copy_options::overwrite_existing);
  auto reopened = BatchBuffer::Open(restarted, 100);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_EQ(Seqs((*reopened)->pending()), Seqs((*buffer)->pending()));
  EXPECT_EQ((*reopened)->next_seq(), (*buffer)->next_seq());
  std::map<double, std::set<uint64_t>> seqs_of_value;
  for (const auto* pending : {&(*buffer)->pending(), &(*reopened)->pending()}) {
    for (const v1::VitalsBatch& b : *pending) {
      for (const v1::VitalSample& s : b.samples()) seqs_of_value[s.value()].insert(s.seq());
    }
  }
  EXPECT_EQ(seqs_of_value.size(), 5u);
  for (const auto& [value, seqs] : seqs_of_value) {
    EXPECT_EQ(seqs.size(), 1u) << "the sample of value " << value << " has " << seqs.size()
                               << " seqs";
  }
  reopened->reset();
  std::filesystem::remove(restarted);
  std::filesystem::remove(restarted + ".lock");
}

// Only a missing file is a new device's. A path that cannot be opened for another reason (a
// symlink loop, a path under a regular file) is an error naming it, and nothing is written there.
TEST_F(BatchBufferTest, APathThatCannotBeOpenedIsAnError) {
  std::filesystem::create_symlink(path_, path_);
  ExpectNamesPathAndReason(BatchBuffer::Open(path_, 100).status(), path_, ELOOP);
  EXPECT_TRUE(std::filesystem::is_symlink(path_));
  std::filesystem::remove(path_);

  {
    std::ofstream out(path_, std::ios::binary);
    out << "a regular file";
  }
  const std::string under = path_ + "/buffer";
  ExpectNamesPathAndReason(BatchBuffer::Open(under, 100).status(), under, ENOTDIR);
  EXPECT_EQ(Bytes(path_), "a regular file");
}

// A buffer file that is there but cannot be opened (here: the device's user may not read it) holds
// batches never acked: Open fails, and the file keeps its bytes instead of being replaced by an
// empty buffer (its directory would let it be).
TEST_F(BatchBufferTest, AFileThatCannotBeOpenedIsAnErrorAndKeepsItsBytes) {
  const std::string dir = NewDirectory();
  const std::string file = dir + "/buffer";
  {
    auto buffer = BatchBuffer::Open(file, 100);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_TRUE((*buffer)->Seal(Samples(2)).ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
  }
  const std::string original = Bytes(file);
  std::filesystem::permissions(file, std::filesystem::perms::none);
  absl::Status opened;
  {
    UnprivilegedScope nobody;
    ASSERT_TRUE(nobody.ok()) << "cannot run the test as another user than root";
    opened = BatchBuffer::Open(file, 100).status();
  }
  ExpectNamesPathAndReason(opened, file, EACCES);
  std::filesystem::permissions(file, std::filesystem::perms::owner_read |
                                         std::filesystem::perms::owner_write);
  EXPECT_EQ(Bytes(file), original);
  auto reopened = BatchBuffer::Open(file, 100);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_EQ((*reopened)->pending().size(), 2u);
  reopened->reset();
  std::filesystem::remove_all(dir);
}

// A file that opens but cannot be read (here: the buffer path is a symlink to a directory, which
// fopen opens and fread fails on with EISDIR) is an error, not a file that ended early: the buffer
// would otherwise be compacted to what was read, and renamed over what was not.
TEST_F(BatchBufferTest, AReadErrorIsAnErrorNotTheEndOfTheFile) {
  const std::string dir = path_ + ".dir";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directory(dir);
  std::filesystem::create_symlink(dir, path_);
  ExpectNamesPathAndReason(BatchBuffer::Open(path_, 100).status(), path_, EISDIR);
  EXPECT_TRUE(std::filesystem::is_symlink(path_));
  EXPECT_FALSE(std::filesystem::exists(path_ + ".tmp"));
  std::filesystem::remove(path_);
  std::filesystem::remove_all(dir);
}

// A record in the middle of the file that this buffer did not write (a damaged sector, a stray
// write): the file's bytes are kept aside for the batches after it, and the buffer goes on with
// those before it.
TEST_F(BatchBufferTest, ADamagedFileIsKeptAsideAndTheBatchesBeforeTheDamageKept) {
  {
    auto buffer = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(buffer.ok());
    for (int i = 0; i < 3; ++i) ASSERT_TRUE((*buffer)->Seal(Samples(2)).ok());
  }
  std::string original;
  {
    std::ifstream in(path_, std::ios::binary);
    original.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  // Records: [u32 length][u8 type][u32 header sum][u32 payload sum][payload]; the counters
  // first, then the three batches.
  auto record_end = [&](size_t at) {
    const auto byte = [&](size_t i) { return static_cast<uint32_t>(static_cast<unsigned char>(original[i])); };
    return at + 13 + ((byte(at) << 24) | (byte(at + 1) << 16) | (byte(at + 2) << 8) | byte(at + 3));
  };
  const size_t second_batch = record_end(record_end(0));
  ASSERT_LT(second_batch + 4, original.size());
  std::string damaged = original;
  damaged[second_batch + 4] = 0x7f;  // a record type the buffer never writes
  {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out << damaged;
  }
  {
    // The seqs of the batches after the damage (3-6) may have been sent and stored: the buffer
    // goes on from first_seq, not from 3.
    auto buffer = BatchBuffer::Open(path_, 100, /*first_seq=*/1000);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_EQ((*buffer)->pending().size(), 1u);
    EXPECT_EQ((*buffer)->pending()[0].batch_seq(), 1u);
    EXPECT_EQ((*buffer)->next_seq(), 1000u);
    ASSERT_FALSE((*buffer)->damaged_copy().empty());
    std::ifstream kept((*buffer)->damaged_copy(), std::ios::binary);
    EXPECT_EQ(std::string(std::istreambuf_iterator<char>(kept), std::istreambuf_iterator<char>()),
              damaged);
    std::filesystem::remove((*buffer)->damaged_copy());
  }
  auto rewritten = BatchBuffer::Open(path_, 100, /*first_seq=*/5000);
  ASSERT_TRUE(rewritten.ok());
  EXPECT_EQ((*rewritten)->pending().size(), 1u);
  EXPECT_TRUE((*rewritten)->damaged_copy().empty());
  EXPECT_EQ((*rewritten)->next_seq(), 1000u);
}

// A new file numbers its samples from first_seq; a file that exists goes on from its own counters,
// whatever first_seq is.
TEST_F(BatchBufferTest, ANewFileStartsAtFirstSeqAndAnExistingOneGoesOn) {
  {
    auto buffer = BatchBuffer::Open(path_, 100, /*first_seq=*/1'000'000);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_TRUE((*buffer)->Seal(Samples(2)).ok());
    EXPECT_EQ((*buffer)->pending()[0].samples(0).seq(), 1'000'000u);
    EXPECT_EQ((*buffer)->pending()[0].samples(1).seq(), 1'000'001u);
  }
  auto reopened = BatchBuffer::Open(path_, 100, /*first_seq=*/5);
  ASSERT_TRUE(reopened.ok());
  EXPECT_EQ((*reopened)->next_seq(), 1'000'002u);
  ASSERT_TRUE((*reopened)->Seal(Samples(1)).ok());
  EXPECT_EQ((*reopened)->pending().back().samples(0).seq(), 1'000'002u);
}

// A device whose disk is full cannot compact its buffer when it starts: it opens on the file as it
// is and keeps sealing and sending, instead of never starting again.
TEST_F(BatchBufferTest, OpensOnTheFileAsItIsWhenItCannotCompactIt) {
  {
    auto buffer = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(buffer.ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
    ASSERT_TRUE((*buffer)->Ack(1).ok());
  }
  // The compaction's new file cannot be created (a directory stands in its way).
  const std::string tmp = path_ + ".tmp";
  std::filesystem::create_directories(tmp + "/blocked");
  {
    auto buffer = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_EQ((*buffer)->pending().size(), 1u);
    EXPECT_EQ((*buffer)->pending()[0].batch_seq(), 2u);
    EXPECT_EQ(*(*buffer)->Seal(Samples(1)), 3u);
  }
  std::filesystem::remove_all(tmp);
  auto reopened = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  ASSERT_EQ((*reopened)->pending().size(), 2u);
  EXPECT_EQ((*reopened)->pending()[1].batch_seq(), 3u);
  EXPECT_EQ((*reopened)->pending()[1].samples(0).seq(), 3u);
}

// A compaction at Open whose rename cannot be made durable (here: the directory cannot be opened
// to be synced) is an error. The buffer is on the compacted file by then: going on as if the
// compaction had failed would append to that file at the old file's length, past its end.
TEST_F(BatchBufferTest, ACompactionThatCannotBeMadeDurableIsAnErrorAndLosesNothing) {
  const std::string dir = NewDirectory();
  const std::string file = dir + "/buffer";
  {
    auto buffer = BatchBuffer::Open(file, 100);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_TRUE((*buffer)->Seal(Samples(2)).ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
    ASSERT_TRUE((*buffer)->Ack(1).ok());  // the compacted file is shorter than this one
  }
  std::filesystem::permissions(file, std::filesystem::perms::all);
  std::filesystem::permissions(file + ".lock", std::filesystem::perms::all);
  // Files can be made and renamed in it, but it cannot be opened (to be synced).
  using std::filesystem::perms;
  std::filesystem::permissions(dir, perms::all & ~(perms::owner_read | perms::group_read |
                                                   perms::others_read));
  absl::Status opened;
  {
    UnprivilegedScope nobody;
    ASSERT_TRUE(nobody.ok()) << "cannot run the test as another user than root";
    auto buffer = BatchBuffer::Open(file, 100);
    opened = buffer.status();
    if (buffer.ok()) (*buffer)->Seal(Samples(1)).IgnoreError();
  }
  std::filesystem::permissions(dir, perms::all);
  ExpectNamesPathAndReason(opened, dir, EACCES);
  auto reopened = BatchBuffer::Open(file, 100);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_TRUE((*reopened)->damaged_copy().empty()) << (*reopened)->damaged_copy();
  ASSERT_GE((*reopened)->pending().size(), 1u);
  EXPECT_EQ((*reopened)->pending()[0].batch_seq(), 2u);
  reopened->reset();
  std::filesystem::remove_all(dir);
}

TEST_F(BatchBufferTest, IsBoundedAndToleratesATornTail) {
  uintmax_t whole = 0;
  {
    auto buffer = BatchBuffer::Open(path_, 3);
    ASSERT_TRUE(buffer.ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
    whole = std::filesystem::file_size(path_);
    ASSERT_TRUE((*buffer)->Seal(Samples(5)).ok());
    EXPECT_EQ((*buffer)->Seal(Samples(1)).status().code(), absl::StatusCode::kResourceExhausted);
  }
  const std::string three = Bytes(path_);
  // Power lost in the middle of writing the last record: the part of it written (its header cut
  // short, or its payload) is ignored without a word, the rest survives.
  for (const uintmax_t cut : {whole + 3, whole + 9, uintmax_t{three.size()} - 1}) {
    {
      std::ofstream out(path_, std::ios::binary | std::ios::trunc);
      out << three.substr(0, cut);
    }
    auto reopened = BatchBuffer::Open(path_, 3, /*first_seq=*/1000);
    ASSERT_TRUE(reopened.ok()) << reopened.status();
    EXPECT_EQ((*reopened)->pending().size(), 2u) << cut;
    EXPECT_TRUE((*reopened)->damaged_copy().empty()) << cut;
    EXPECT_EQ((*reopened)->next_seq(), 3u) << cut;
  }
}

// The unacked batches' bytes are bounded too (they are in the device's memory as well as in the
// file): a batch that would take them past the bound is refused, and nothing of it is sealed (its
// seqs go to the next batch); once an ack makes room it is taken. A file opened with a lower bound
// than it was written under keeps every batch it holds; a batch alone is always taken.
TEST_F(BatchBufferTest, TheUnackedBatchesBytesAreBounded) {
  // A sealed batch of 10 samples, every seq here under 128 (one byte each).
  v1::VitalsBatch sized = Samples(10);
  sized.set_batch_seq(1);
  for (v1::VitalSample& sample : *sized.mutable_samples()) sample.set_seq(1);
  const size_t one = sized.ByteSizeLong();
  uint64_t first = 0;
  {
    auto buffer = BatchBuffer::Open(path_, 100, /*first_seq=*/1, /*max_bytes=*/3 * one);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    absl::StatusOr<uint64_t> sealed = (*buffer)->Seal(Samples(10));
    ASSERT_TRUE(sealed.ok()) << sealed.status();
    first = *sealed;
    ASSERT_TRUE((*buffer)->Seal(Samples(10)).ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(10)).ok());
    const size_t held = (*buffer)->pending_bytes();
    EXPECT_EQ(held, 3 * one);
    const uint64_t next_seq = (*buffer)->next_seq();
    const uintmax_t file = std::filesystem::file_size(path_);
    absl::StatusOr<uint64_t> refused = (*buffer)->Seal(Samples(10));
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_NE(refused.status().message().find("past its " + std::to_string(3 * one) + " bytes"),
              std::string::npos)
        << refused.status();
    EXPECT_EQ((*buffer)->pending().size(), 3u);
    EXPECT_EQ((*buffer)->pending_bytes(), held);
    EXPECT_EQ((*buffer)->next_seq(), next_seq);
    EXPECT_EQ(std::filesystem::file_size(path_), file);
    ASSERT_TRUE((*buffer)->Ack(first).ok());
    EXPECT_LT((*buffer)->pending_bytes(), held);
    absl::StatusOr<uint64_t> taken = (*buffer)->Seal(Samples(10));
    ASSERT_TRUE(taken.ok()) << taken.status();
    EXPECT_EQ((*buffer)->pending().back().samples(0).seq(), next_seq);
  }
  auto narrower = BatchBuffer::Open(path_, 100, 1, /*max_bytes=*/one);
  ASSERT_TRUE(narrower.ok()) << narrower.status();
  EXPECT_EQ((*narrower)->pending().size(), 3u);
  EXPECT_GT((*narrower)->pending_bytes(), one);
  EXPECT_EQ((*narrower)->Seal(Samples(1)).status().code(), absl::StatusCode::kResourceExhausted);
  for (const v1::VitalsBatch& b : std::deque<v1::VitalsBatch>((*narrower)->pending())) {
    ASSERT_TRUE((*narrower)->Ack(b.batch_seq()).ok());
  }
  EXPECT_EQ((*narrower)->pending_bytes(), 0u);
  EXPECT_TRUE((*narrower)->Seal(Samples(20)).ok());  // alone, though over the bound
}

// Acked batches leave the file at its compactions, which come sooner for a small bound: a file of
// at most 2 batches waiting holds, besides them, at most 16 acked ones however many were acked
// (at least 16: a bound of 1 or 2 does not rewrite the file at every ack).
TEST_F(BatchBufferTest, TheFileHoldsABoundedNumberOfAckedBatches) {
  auto buffer = BatchBuffer::Open(path_, 2);
  ASSERT_TRUE(buffer.ok());
  const uintmax_t empty = std::filesystem::file_size(path_);
  absl::StatusOr<uint64_t> first = (*buffer)->Seal(Samples(500));
  ASSERT_TRUE(first.ok());
  const uintmax_t batch = std::filesystem::file_size(path_) - empty;
  ASSERT_TRUE((*buffer)->Ack(*first).ok());
  // A compaction renames a new file over the old one: the file's inode tells when it came.
  auto inode = [&] {
    struct stat st;
    return stat(path_.c_str(), &st) == 0 ? st.st_ino : ino_t{0};
  };
  int compactions = 0;
  for (int acks = 2; acks <= 64; ++acks) {
    absl::StatusOr<uint64_t> sealed = (*buffer)->Seal(Samples(500));
    ASSERT_TRUE(sealed.ok());
    const ino_t before = inode();
    ASSERT_TRUE((*buffer)->Ack(*sealed).ok());
    // Every 16th ack compacts the file, and only that one.
    const bool compacted = inode() != before;
    EXPECT_EQ(compacted, acks % 16 == 0) << acks;
    compactions += compacted ? 1 : 0;
    // 16 batches and their acks at most (an ack's record is far smaller than a batch's).
    EXPECT_LE(std::filesystem::file_size(path_), empty + 17 * batch) << acks;
  }
  EXPECT_EQ(compactions, 4);
  EXPECT_TRUE((*buffer)->pending().empty());
}

// Large batches compact the file by their bytes too: with room for 10,000 batches (a compaction
// every 1,024 acks by count), it never holds more than max_bytes of acked batches and one more
// besides the unacked ones, as it never holds more unacked ones.
TEST_F(BatchBufferTest, TheFileHoldsAtMostMaxBytesOfAckedBatches) {
  constexpr size_t kMaxBytes = 64 * 1024;
  auto buffer = BatchBuffer::Open(path_, 10000, 1, kMaxBytes);
  ASSERT_TRUE(buffer.ok());
  const uintmax_t empty = std::filesystem::file_size(path_);
  absl::StatusOr<uint64_t> first = (*buffer)->Seal(Samples(500));
  ASSERT_TRUE(first.ok());
  const uintmax_t batch = std::filesystem::file_size(path_) - empty;
  ASSERT_LT(batch, kMaxBytes / 4);  // several acked batches before a compaction
  ASSERT_TRUE((*buffer)->Ack(*first).ok());
  uintmax_t largest = 0;
  for (int acks = 2; acks <= 200; ++acks) {
    absl::StatusOr<uint64_t> sealed = (*buffer)->Seal(Samples(500));
    ASSERT_TRUE(sealed.ok());
    largest = std::max<uintmax_t>(largest, std::filesystem::file_size(path_));
    ASSERT_TRUE((*buffer)->Ack(*sealed).ok());
    largest = std::max<uintmax_t>(largest, std::filesystem::file_size(path_));
  }
  // max_bytes of acked batches, one more acked and one unacked, and the acks' small records.
  EXPECT_LE(largest, empty + kMaxBytes + 3 * batch) << "one batch: " << batch << " bytes";
  EXPECT_EQ((*buffer)->compaction_failures(), 0u);
  EXPECT_TRUE((*buffer)->pending().empty());
}

// Power lost after the file grew but before the whole last record reached the disk: the blocks
// that did not read as zeros. Whether none of the record arrived (its header zeros too), only the
// part of its header in the sector it starts in, none of its payload, or only the payload's first
// sectors, it is a torn tail, not damage: nothing is copied aside, and the buffer opens even with
// no room to compact it (a full disk); its seqs go on from first_seq at least, as the record's may
// have been given out.
TEST_F(BatchBufferTest, ALastRecordOfTheRightLengthButNotWholeIsATornTail) {
  constexpr size_t kCheckedHeader = 13;  // length, type, and the two sums
  constexpr size_t kSector = 512;
  // Two batches, the second's code padded so that the third record starts 4 bytes before a
  // sector's end: its header runs into the next sector.
  uintmax_t whole = 0;
  std::string written;
  for (size_t pad = 1; pad <= 2 * kSector && whole % kSector != kSector - 4; ++pad) {
    std::filesystem::remove(path_);
    auto buffer = BatchBuffer::Open(path_, 10);
    ASSERT_TRUE(buffer.ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
    v1::VitalsBatch padded = Samples(1);
    padded.mutable_samples(0)->set_loinc_code(std::string(pad, 'p'));
    ASSERT_TRUE((*buffer)->Seal(padded).ok());
    whole = std::filesystem::file_size(path_);
    ASSERT_TRUE((*buffer)->Seal(Samples(300)).ok());  // over 2 KiB: several sectors
    buffer->reset();
    written = Bytes(path_);
  }
  ASSERT_EQ(whole % kSector, kSector - 4);
  const size_t second_sector = (whole + kCheckedHeader + kSector) / kSector * kSector;
  ASSERT_LT(second_sector + kSector, written.size());
  const struct {
    const char* name;
    size_t zeros_from;
  } kTorn[] = {
      {"nothing of the record", whole},
      {"the part of its header in its first sector", whole + 4},
      {"its header alone", whole + kCheckedHeader},
      {"its payload's first sectors", second_sector},
  };
  for (const auto& torn : kTorn) {
    SCOPED_TRACE(torn.name);
    std::string bytes = written;
    for (size_t i = torn.zeros_from; i < bytes.size(); ++i) bytes[i] = 0;
    {
      std::ofstream out(path_, std::ios::binary | std::ios::trunc);
      out << bytes;
    }
    // No room for a compacted copy, nor for a copy of the file aside.
    std::signal(SIGXFSZ, SIG_IGN);
    rlimit saved;
    ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
    rlimit limited = saved;
    limited.rlim_cur = 16;
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limited), 0);
    auto reopened = BatchBuffer::Open(path_, 10, /*first_seq=*/1000);
    setrlimit(RLIMIT_FSIZE, &saved);
    std::signal(SIGXFSZ, SIG_DFL);
    ASSERT_TRUE(reopened.ok()) << reopened.status();
    // The compaction's write failed: its file is removed, not left half-written.
    EXPECT_FALSE(std::filesystem::exists(path_ + ".tmp"));
    EXPECT_TRUE((*reopened)->damaged_copy().empty()) << (*reopened)->damaged_copy();
    EXPECT_EQ((*reopened)->pending().size(), 2u);
    EXPECT_EQ((*reopened)->next_seq(), 1000u);
    // Appends go on past the torn record; reopened, the file has the two batches and the new one.
    absl::StatusOr<uint64_t> later = (*reopened)->Seal(Samples(1));
    ASSERT_TRUE(later.ok()) << later.status();
    reopened->reset();
    auto again = BatchBuffer::Open(path_, 10);
    ASSERT_TRUE(again.ok()) << again.status();
    ASSERT_EQ((*again)->pending().size(), 3u);
    EXPECT_EQ((*again)->pending().back().samples(0).seq(), 1000u);
    EXPECT_TRUE((*again)->damaged_copy().empty());
  }
}

// Zeros at the end of the file over more than one batch are records lost after they were written,
// not a torn append: damage, kept aside.
TEST_F(BatchBufferTest, ZerosOverMoreThanOneRecordAreDamage) {
  uintmax_t whole = 0;
  {
    auto buffer = BatchBuffer::Open(path_, 10);
    ASSERT_TRUE(buffer.ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
    whole = std::filesystem::file_size(path_);
  }
  {
    std::ofstream out(path_, std::ios::binary | std::ios::app);
    out << std::string(2 * kMaxBatchBytes + 4096, '\0');
  }
  auto reopened = BatchBuffer::Open(path_, 10, /*first_seq=*/1000);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_FALSE((*reopened)->damaged_copy().empty());
  EXPECT_EQ((*reopened)->pending().size(), 1u);
  EXPECT_EQ((*reopened)->next_seq(), 1000u);
  EXPECT_EQ(std::filesystem::file_size((*reopened)->damaged_copy()),
            whole + 2 * kMaxBatchBytes + 4096);
  std::filesystem::remove((*reopened)->damaged_copy());
}

// A last record of the right length with other bytes than it was written with, not zeros where a
// torn write leaves them (damaged after it was written whole): damage, kept aside, not dropped as
// a torn tail. So is one whose zeroed sector is followed by bytes that did reach the disk.
TEST_F(BatchBufferTest, ALastRecordDamagedAfterItWasWrittenIsKeptAside) {
  uintmax_t whole = 0;
  {
    auto buffer = BatchBuffer::Open(path_, 10);
    ASSERT_TRUE(buffer.ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
    whole = std::filesystem::file_size(path_);
    ASSERT_TRUE((*buffer)->Seal(Samples(300)).ok());
  }
  const std::string written = Bytes(path_);
  constexpr size_t kCheckedHeader = 13;
  constexpr size_t kSector = 512;
  const size_t second_sector = (whole + kCheckedHeader + kSector) / kSector * kSector;
  ASSERT_LT(second_sector + kSector, written.size());
  std::string flipped = written;
  flipped[whole + kCheckedHeader + 2] ^= 0x40;
  std::string zeroed_inside = written;
  for (size_t i = second_sector; i < second_sector + kSector; ++i) zeroed_inside[i] = 0;
  for (const std::string& bytes : {flipped, zeroed_inside}) {
    {
      std::ofstream out(path_, std::ios::binary | std::ios::trunc);
      out << bytes;
    }
    auto reopened = BatchBuffer::Open(path_, 10, /*first_seq=*/1000);
    ASSERT_TRUE(reopened.ok()) << reopened.status();
    EXPECT_FALSE((*reopened)->damaged_copy().empty());
    EXPECT_EQ((*reopened)->pending().size(), 1u);
    EXPECT_EQ((*reopened)->next_seq(), 1000u);
    std::filesystem::remove((*reopened)->damaged_copy());
    reopened->reset();
    std::filesystem::remove(path_);
  }
}

// Zeros that end the file are a torn append only in the shape a power loss leaves: the last
// record's bytes to the end of the sector it starts in, or none of them, then zeros. Zeros from
// the middle of that sector, or past the end of a record whose header reads whole, with records
// after it, cover records synced before: damage, kept aside, not dropped without a word. (Found
// by batch_buffer_fuzz_test.) So is a type byte that reads as a record without sums, with a
// length past the end of the file, or with the sums read as a counters record's next seq.
TEST_F(BatchBufferTest, ZerosOrTypesNoTornAppendLeavesAreDamage) {
  constexpr size_t kCheckedHeader = 13;
  constexpr size_t kSector = 512;
  size_t first_batch = 0;
  {
    auto buffer = BatchBuffer::Open(path_, 10);
    ASSERT_TRUE(buffer.ok());
    first_batch = std::filesystem::file_size(path_);  // after the counters record
    ASSERT_TRUE((*buffer)->Seal(Samples(60)).ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(60)).ok());
    ASSERT_TRUE((*buffer)->Ack(1).ok());
  }
  const std::string written = Bytes(path_);
  ASSERT_LT(first_batch + kCheckedHeader, kSector - 8);
  ASSERT_NE(written[first_batch + 2], '\0');  // the length's third byte: a batch over 255 bytes
  ASSERT_GT(written.size(), 2 * kSector);
  auto zeros_from = [&](size_t at) {
    std::string bytes = written;
    std::fill(bytes.begin() + static_cast<std::ptrdiff_t>(at), bytes.end(), '\0');
    return bytes;
  };
  std::string legacy_length = written;  // the counters record's type without its sums' bit
  legacy_length[4] = 0x05;
  legacy_length[2] = 0x7f;
  std::string legacy_counters = written;
  legacy_counters[4] &= 0x7f;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"zeros from inside the first batch's header", zeros_from(first_batch + 3)},
      {"zeros from the middle of its first sector", zeros_from(first_batch + 200)},
      {"zeros from near its sector's end, its header whole", zeros_from(kSector - 4)},
      {"a type without sums, an unknown one, its length past the end", legacy_length},
      {"a counters record read without sums", legacy_counters},
  };
  for (const auto& [what, bytes] : cases) {
    SCOPED_TRACE(what);
    {
      std::ofstream out(path_, std::ios::binary | std::ios::trunc);
      out << bytes;
    }
    auto reopened = BatchBuffer::Open(path_, 10, /*first_seq=*/1000);
    ASSERT_TRUE(reopened.ok()) << reopened.status();
    EXPECT_FALSE((*reopened)->damaged_copy().empty());
    EXPECT_TRUE((*reopened)->pending().empty());
    EXPECT_EQ((*reopened)->next_seq(), 1000u);
    if (!(*reopened)->damaged_copy().empty()) {
      EXPECT_EQ(Bytes((*reopened)->damaged_copy()), bytes);
      std::filesystem::remove((*reopened)->damaged_copy());
    }
    reopened->reset();
    std::filesystem::remove(path_);
  }
}

// Every record was written as [u32 length][u8 type][payload] before records had sums: such a
// file still opens, torn last record included, and is rewritten in the current format.
TEST_F(BatchBufferTest, AFileWrittenBeforeRecordSumsStillOpens) {
  auto record = [](char type, const std::string& payload) {
    std::string out;
    for (int shift : {24, 16, 8, 0}) out.push_back(static_cast<char>(payload.size() >> shift));
    out.push_back(type);
    return out + payload;
  };
  auto u64 = [](uint64_t v) {
    std::string out;
    for (int shift = 56; shift >= 0; shift -= 8) out.push_back(static_cast<char>(v >> shift));
    return out;
  };
  v1::VitalsBatch first = Samples(2);
  first.set_batch_seq(7);
  first.mutable_samples(0)->set_seq(20);
  first.mutable_samples(1)->set_seq(21);
  v1::VitalsBatch second = Samples(1);
  second.set_batch_seq(8);
  second.mutable_samples(0)->set_seq(22);
  {
    std::ofstream out(path_, std::ios::binary);
    out << record(3, u64(20) + u64(7)) << record(1, first.SerializeAsString())
        << record(1, second.SerializeAsString()) << record(2, u64(7))
        << record(1, second.SerializeAsString()).substr(0, 9);  // a torn last record
  }
  for (int open = 0; open < 2; ++open) {
    auto buffer = BatchBuffer::Open(path_, 10, /*first_seq=*/1000);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    EXPECT_TRUE((*buffer)->damaged_copy().empty()) << (*buffer)->damaged_copy();
    ASSERT_EQ((*buffer)->pending().size(), 1u);
    EXPECT_EQ((*buffer)->pending()[0].batch_seq(), 8u);
    EXPECT_EQ((*buffer)->next_seq(), 23u);
  }
}

// A length damaged in the middle of the file (here 65536 more) makes the record run past the end
// of the file, as a torn last record does: the records' sums tell it apart. The file is kept
// aside for the batches after the damage, and the seqs go on from first_seq, not from those
// before the damage (those after it may have been sent and stored).
TEST_F(BatchBufferTest, ADamagedLengthInTheMiddleIsKeptAsideNotTakenForATornTail) {
  uintmax_t second_batch = 0;
  {
    auto buffer = BatchBuffer::Open(path_, 100);
    ASSERT_TRUE(buffer.ok());
    ASSERT_TRUE((*buffer)->Seal(Samples(2)).ok());
    second_batch = std::filesystem::file_size(path_);
    for (int i = 0; i < 2; ++i) ASSERT_TRUE((*buffer)->Seal(Samples(2)).ok());
  }
  std::string damaged = Bytes(path_);
  ASSERT_LT(second_batch + 65536, 65536 + damaged.size());
  damaged[second_batch + 1] = static_cast<char>(damaged[second_batch + 1] + 1);  // +65536
  {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out << damaged;
  }
  auto buffer = BatchBuffer::Open(path_, 100, /*first_seq=*/1000);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  ASSERT_EQ((*buffer)->pending().size(), 1u);
  EXPECT_EQ((*buffer)->pending()[0].batch_seq(), 1u);
  EXPECT_EQ((*buffer)->next_seq(), 1000u);
  ASSERT_FALSE((*buffer)->damaged_copy().empty());
  EXPECT_EQ(Bytes((*buffer)->damaged_copy()), damaged);
  std::filesystem::remove((*buffer)->damaged_copy());
}

// Two buffers on one file would give out the same seqs, and one's compaction would rename a new
// file over the one the other appends to. The second is refused while the first lives (its
// compaction at Open renamed the file: the lock is still held), and welcome once it is gone.
TEST_F(BatchBufferTest, ASecondBufferOnTheSameFileIsRefusedWhileTheFirstLives) {
  auto first = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE((*first)->Seal(Samples(1)).ok());
  auto second = BatchBuffer::Open(path_, 100);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
  EXPECT_NE(second.status().message().find("'" + path_ + "'"), absl::string_view::npos)
      << second.status();
  EXPECT_NE(second.status().message().find("another process holds"), absl::string_view::npos)
      << second.status();
  EXPECT_EQ((*first)->pending().size(), 1u);
  EXPECT_TRUE((*first)->Seal(Samples(1)).ok());
  first->reset();
  auto third = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ((*third)->pending().size(), 2u);
}

// The copy of a damaged file must be durable before the rewrite's rename ends the original. Its
// name is durable only with its directory: when the directory cannot be synced (here it cannot be
// opened), Open fails and leaves the damaged file as it is. (That the copy's bytes are synced
// too cannot be seen without a power loss.)
TEST_F(BatchBufferTest, ADamagedFileWhoseCopyCannotBeMadeDurableIsLeftAsItIs) {
  const std::string dir = NewDirectory();
  const std::string file = dir + "/buffer";
  uintmax_t second_batch = 0;
  {
    auto buffer = BatchBuffer::Open(file, 100);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_TRUE((*buffer)->Seal(Samples(2)).ok());
    second_batch = std::filesystem::file_size(file);
    ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
  }
  std::string damaged = Bytes(file);
  damaged[second_batch + 4] = 0x7f;  // a record type the buffer never writes
  {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out << damaged;
  }
  std::filesystem::permissions(file, std::filesystem::perms::all);
  std::filesystem::permissions(file + ".lock", std::filesystem::perms::all);
  using std::filesystem::perms;
  std::filesystem::permissions(dir, perms::all & ~(perms::owner_read | perms::group_read |
                                                   perms::others_read));
  absl::Status opened;
  {
    UnprivilegedScope nobody;
    ASSERT_TRUE(nobody.ok()) << "cannot run the test as another user than root";
    opened = BatchBuffer::Open(file, 100).status();
  }
  std::filesystem::permissions(dir, perms::all);
  EXPECT_EQ(opened.code(), absl::StatusCode::kDataLoss) << opened;
  ExpectNamesPathAndReason(opened, dir, EACCES);
  EXPECT_EQ(Bytes(file), damaged);
  std::filesystem::remove_all(dir);
}

// A compaction whose rename cannot be made durable (the directory cannot be synced) is an error,
// and so is every append after it until the directory is synced: a batch reported durable on the
// new file would be gone with it if a power loss brought the old file back.
TEST_F(BatchBufferTest, AppendsFailUntilTheLastRenameIsDurable) {
  const std::string dir = NewDirectory();
  const std::string file = dir + "/buffer";
  auto buffer = BatchBuffer::Open(file, 100);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  ASSERT_TRUE((*buffer)->Seal(Samples(2)).ok());
  ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
  using std::filesystem::perms;
  std::filesystem::permissions(dir, perms::all & ~(perms::owner_read | perms::group_read |
                                                   perms::others_read));
  absl::Status restarted;
  absl::StatusOr<uint64_t> sealed;
  absl::Status acked;
  {
    UnprivilegedScope nobody;
    ASSERT_TRUE(nobody.ok()) << "cannot run the test as another user than root";
    // The rewrite renames its file over the buffer file; the directory cannot be synced.
    restarted = (*buffer)->RestartSeqsAbove(/*acked_batch_seq=*/1, 100, {});
    sealed = (*buffer)->Seal(Samples(1));
    acked = (*buffer)->Ack(2);
  }
  ExpectNamesPathAndReason(restarted, dir, EACCES);
  ExpectNamesPathAndReason(sealed.status(), dir, EACCES);
  ExpectNamesPathAndReason(acked, dir, EACCES);
  std::filesystem::permissions(dir, perms::all);
  // Once the directory can be synced, appends are durable again.
  absl::StatusOr<uint64_t> later = (*buffer)->Seal(Samples(1));
  ASSERT_TRUE(later.ok()) << later.status();
  buffer->reset();
  auto reopened = BatchBuffer::Open(file, 100);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  // The ack that failed was not written: its batch is sent again after a restart.
  ASSERT_EQ((*reopened)->pending().size(), 2u);
  EXPECT_EQ((*reopened)->pending()[0].batch_seq(), 2u);
  EXPECT_EQ((*reopened)->pending()[1].batch_seq(), *later);
  reopened->reset();
  std::filesystem::remove_all(dir);
}

// A write that fails half-way (here: the process's file size limit, as a full disk would) leaves
// nothing of its record in the file: the batches sealed after it are found on the next start.
TEST_F(BatchBufferTest, AFailedSealLeavesNoTornRecordBeforeLaterBatches) {
  auto buffer = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(buffer.ok());
  ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
  const auto size = static_cast<rlim_t>(std::filesystem::file_size(path_));
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit saved;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  rlimit limited = saved;
  limited.rlim_cur = size + 64;  // room for part of the next record only
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limited), 0);
  absl::StatusOr<uint64_t> failed = (*buffer)->Seal(Samples(100));
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &saved), 0);
  std::signal(SIGXFSZ, SIG_DFL);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(std::filesystem::file_size(path_), size);
  EXPECT_EQ((*buffer)->pending().size(), 1u);
  absl::StatusOr<uint64_t> later = (*buffer)->Seal(Samples(2));
  ASSERT_TRUE(later.ok()) << later.status();
  buffer->reset();

  auto reopened = BatchBuffer::Open(path_, 100);
  ASSERT_TRUE(reopened.ok());
  const auto& pending = (*reopened)->pending();
  ASSERT_EQ(pending.size(), 2u);
  EXPECT_EQ(pending[0].batch_seq(), 1u);
  EXPECT_EQ(pending[1].batch_seq(), *later);
  EXPECT_EQ(pending[1].samples_size(), 2);
}

// A compaction that cannot write its new file keeps the buffer on the file it had: what is sealed
// afterwards is durable and found on the next start.
TEST_F(BatchBufferTest, AFailedCompactionKeepsAppendingToTheBufferFile) {
  auto buffer = BatchBuffer::Open(path_, 2000);
  ASSERT_TRUE(buffer.ok());
  constexpr uint64_t kBatches = 1100;  // more than the acks that start a compaction
  for (uint64_t i = 0; i < kBatches; ++i) ASSERT_TRUE((*buffer)->Seal(Samples(1)).ok());
  // The compacted file cannot be created (a directory has its name).
  std::filesystem::create_directory(path_ + ".tmp");
  // The acks are recorded all the same; the failed compaction is counted, and tried again
  // after as many acks.
  constexpr uint64_t acked = 1050;  // past the 1,024th ack, which starts a compaction
  for (uint64_t b = 1; b <= acked; ++b) ASSERT_TRUE((*buffer)->Ack(b).ok()) << b;
  EXPECT_EQ((*buffer)->compaction_failures(), 1u);
  EXPECT_FALSE((*buffer)->last_compaction_error().empty());
  std::filesystem::remove(path_ + ".tmp");
  absl::StatusOr<uint64_t> later = (*buffer)->Seal(Samples(1));
  ASSERT_TRUE(later.ok()) << later.status();
  buffer->reset();

  auto reopened = BatchBuffer::Open(path_, 2000);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  const auto& pending = (*reopened)->pending();
  ASSERT_EQ(pending.size(), kBatches - acked + 1);
  EXPECT_EQ(pending.front().batch_seq(), acked + 1);
  EXPECT_EQ(pending.back().batch_seq(), *later);
}

}  // namespace
}  // namespace medgate::device
