// Unit tests of the device SDK's sender against an in-process fake DeviceIngest server.
#include "libs/device_sdk/device_client.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "libs/device_sdk/batch_buffer.h"
#include "tests/support/fuzz.h"
#include "tests/support/poll.h"

namespace medgate::device {
namespace {

using Stream = grpc::ServerReaderWriter<v1::IngestAck, v1::VitalsBatch>;

// Every sample of `batch` stored.
v1::IngestAck Stored(const v1::VitalsBatch& batch) {
  v1::IngestAck ack;
  ack.set_batch_seq(batch.batch_seq());
  ack.set_stored_count(static_cast<uint32_t>(batch.samples_size()));
  ack.set_highest_committed_seq(batch.samples(batch.samples_size() - 1).seq());
  return ack;
}

// A server that holds seqs above every one the buffer gave out (its earlier file was lost): it
// answers every sample as a duplicate, its cursor at 1,000,000.
grpc::Status AnswerAsHeldAboveEverySeq(int, Stream& io) {
  v1::VitalsBatch batch;
  while (io.Read(&batch)) {
    v1::IngestAck ack;
    ack.set_batch_seq(batch.batch_seq());
    ack.set_duplicate_count(static_cast<uint32_t>(batch.samples_size()));
    ack.set_highest_committed_seq(1'000'000);
    io.Write(ack);
  }
  return grpc::Status::OK;
}

// DeviceIngest whose streams run the test's handler, given the stream's number (1, 2, ...).
class FakeIngest final : public v1::DeviceIngest::Service {
 public:
  using Handler = std::function<grpc::Status(int stream, Stream& io)>;

  explicit FakeIngest(Handler handler) : handler_(std::move(handler)) {}

  grpc::Status StreamVitals(grpc::ServerContext*, Stream* io) override {
    int stream;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stream = ++streams_;
    }
    return handler_(stream, *io);
  }

  int streams() {
    std::lock_guard<std::mutex> lock(mu_);
    return streams_;
  }

 private:
  const Handler handler_;
  std::mutex mu_;
  int streams_ = 0;
};

class DeviceClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    options_.buffer_path = (std::filesystem::temp_directory_path() /
                            ("medgate-device-" + std::to_string(getpid()) + "-" +
                             ::testing::UnitTest::GetInstance()->current_test_info()->name()))
                               .string();
    std::filesystem::remove(options_.buffer_path);
    // Quick reconnects, so a test waits for what it checks and not for backoffs.
    options_.backoff_initial = absl::Milliseconds(1);
    options_.backoff_max = absl::Milliseconds(10);
    options_.server_identity = "spiffe://medgate.test/service/ingest";
  }

  void TearDown() override {
    if (client_ != nullptr) client_->Stop();
    if (server_ != nullptr) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    std::filesystem::remove(options_.buffer_path);
    std::filesystem::remove(options_.buffer_path + ".lock");
  }

  // Starts a fake server running `handler` and a client connected to it.
  void Connect(FakeIngest::Handler handler) {
    ingest_ = std::make_unique<FakeIngest>(std::move(handler));
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    if (server_max_message_bytes_ > 0) builder.SetMaxReceiveMessageSize(server_max_message_bytes_);
    builder.RegisterService(ingest_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(port, 0);
    port_ = port;
    auto client = DeviceClient::Open(
        options_, grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                      grpc::InsecureChannelCredentials()));
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
  }

  // The first stream reads the batch and ends with `ended`; the next ones store what they read.
  // The batch is resent until acked, never rejected.
  void ExpectResentAfterTheFirstStreamEndsWith(grpc::Status ended) {
    Connect([ended](int stream, Stream& io) {
      v1::VitalsBatch batch;
      if (stream == 1) {
        io.Read(&batch);
        return ended;
      }
      while (io.Read(&batch)) io.Write(Stored(batch));
      return grpc::Status::OK;
    });
    ASSERT_TRUE(client_->Send(Samples(1)).ok());
    client_->Start();
    ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
    DeviceStats stats = client_->stats();
    EXPECT_EQ(stats.batches_acked, 1u);
    EXPECT_EQ(stats.batches_rejected, 0u);
    EXPECT_GE(ingest_->streams(), 2);
  }

  static std::vector<v1::VitalSample> Samples(int n) {
    std::vector<v1::VitalSample> samples(static_cast<size_t>(n));
    for (v1::VitalSample& s : samples) {
      s.set_loinc_code("8867-4");
      s.set_ucum_unit("/min");
      s.set_value(60);
      s.mutable_measured_at()->set_seconds(1700000000);
    }
    return samples;
  }

  DeviceOptions options_;
  int server_max_message_bytes_ = 0;  // the fake server's limits.max_message_bytes; 0: gRPC's
  int port_ = 0;                      // the fake server's, once Connect started it
  std::unique_ptr<FakeIngest> ingest_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<DeviceClient> client_;
};

TEST_F(DeviceClientTest, SendRefusesABatchOutOfTheApiBoundsAndBuffersNothing) {
  auto client = DeviceClient::Open(options_);
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ((*client)->Send({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*client)->Send(Samples(kMaxSamplesPerBatch + 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<v1::VitalSample> huge = Samples(1);
  huge[0].set_loinc_code(std::string(kMaxBatchBytes, 'x'));
  absl::StatusOr<uint64_t> too_big = (*client)->Send(std::move(huge));
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*client)->pending(), 0u);
  // Nothing of them was numbered either: the first batch accepted is batch 1.
  absl::StatusOr<uint64_t> full = (*client)->Send(Samples(kMaxSamplesPerBatch));
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(*full, 1u);
  EXPECT_EQ((*client)->pending(), 1u);
}

// A server that ends the stream with INVALID_ARGUMENT on a batch would do so on every resend: the
// batch is reported and dropped, and the batches behind it are delivered.
TEST_F(DeviceClientTest, ABatchTheServerRefusesAsAWholeIsReportedAndDropped) {
  Connect([](int, Stream& io) {
    v1::VitalsBatch batch;
    while (io.Read(&batch)) {
      if (batch.samples_size() > 2) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "this server takes 2 samples");
      }
      io.Write(Stored(batch));
    }
    return grpc::Status::OK;
  });
  std::mutex mu;
  std::vector<uint64_t> rejected;
  client_->OnRejected([&](const v1::VitalsBatch& batch, const absl::Status& why) {
    EXPECT_EQ(why.code(), absl::StatusCode::kInvalidArgument);
    std::lock_guard<std::mutex> lock(mu);
    rejected.push_back(batch.batch_seq());
  });
  ASSERT_TRUE(client_->Send(Samples(1)).ok());
  ASSERT_TRUE(client_->Send(Samples(3)).ok());
  ASSERT_TRUE(client_->Send(Samples(2)).ok());
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  client_->Stop();
  DeviceStats stats = client_->stats();
  EXPECT_EQ(stats.batches_acked, 2u);
  EXPECT_EQ(stats.batches_rejected, 1u);
  EXPECT_EQ(stats.samples_stored, 3u);
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(rejected, std::vector<uint64_t>{2});
  }
  // Dropped from the file too: a restart does not send it again.
  client_.reset();
  auto buffer = BatchBuffer::Open(options_.buffer_path, 10);
  ASSERT_TRUE(buffer.ok());
  EXPECT_TRUE((*buffer)->pending().empty());
}

// Other errors that end a stream are not about the batch: it is resent until acked.
TEST_F(DeviceClientTest, ABatchIsResentAfterAStreamEndsWithAnotherError) {
  ExpectResentAfterTheFirstStreamEndsWith(
      grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "device not assigned yet"));
}

// Each stream gets one batch acked, then breaks. The backoff starts over after every such stream:
// were it to double across them, the 30 reconnects would wait up to 2^29 ms, far past the wait.
TEST_F(DeviceClientTest, TheBackoffStartsOverAfterAStreamThatGotAnAck) {
  options_.backoff_max = absl::Hours(24);
  Connect([](int, Stream& io) {
    v1::VitalsBatch batch;
    if (io.Read(&batch)) io.Write(Stored(batch));
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "connection reset");
  });
  constexpr uint64_t kBatches = 30;
  for (uint64_t i = 0; i < kBatches; ++i) ASSERT_TRUE(client_->Send(Samples(1)).ok());
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  DeviceStats stats = client_->stats();
  EXPECT_EQ(stats.batches_acked, kBatches);
  EXPECT_GE(stats.reconnects, kBatches - 1);
}

// A server whose limits.max_message_bytes is below a batch's size: gRPC refuses the batch with
// RESOURCE_EXHAUSTED, and would on every resend. The batch is reported and dropped, like one
// refused with INVALID_ARGUMENT, and the batches behind it are delivered.
TEST_F(DeviceClientTest, ABatchOverTheServersMessageSizeIsReportedAndDropped) {
  server_max_message_bytes_ = 4096;
  Connect([](int, Stream& io) {
    v1::VitalsBatch batch;
    while (io.Read(&batch)) io.Write(Stored(batch));
    return grpc::Status::OK;
  });
  std::mutex mu;
  std::vector<std::pair<uint64_t, absl::Status>> rejected;
  client_->OnRejected([&](const v1::VitalsBatch& batch, const absl::Status& why) {
    std::lock_guard<std::mutex> lock(mu);
    rejected.emplace_back(batch.batch_seq(), why);
  });
  std::vector<v1::VitalSample> large = Samples(1);
  large[0].set_ucum_unit(std::string(2 * 4096, 'x'));
  ASSERT_TRUE(client_->Send(Samples(1)).ok());
  ASSERT_TRUE(client_->Send(std::move(large)).ok());
  ASSERT_TRUE(client_->Send(Samples(2)).ok());
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  client_->Stop();
  DeviceStats stats = client_->stats();
  EXPECT_EQ(stats.batches_acked, 2u);
  EXPECT_EQ(stats.batches_rejected, 1u);
  EXPECT_EQ(stats.samples_stored, 3u);
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(rejected.size(), 1u);
  EXPECT_EQ(rejected[0].first, 2u);
  EXPECT_EQ(rejected[0].second.code(), absl::StatusCode::kResourceExhausted) << rejected[0].second;
}

// RESOURCE_EXHAUSTED for anything but the message's size is a quota that passes (here: ingest's
// streams per device): the batch is resent until acked.
TEST_F(DeviceClientTest, ABatchIsResentAfterAStreamEndsWithAQuota) {
  ExpectResentAfterTheFirstStreamEndsWith(
      grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                   "this device already has 4 streams open, the most "
                   "ingest.max_streams_per_device allows"));
}

// A connection that died without a word: the server takes the batch and never answers. Once the
// ack is overdue the stream is given up, and the batch is resent on a new one.
TEST_F(DeviceClientTest, AnOverdueAckEndsTheStreamAndTheBatchIsResent) {
  // Long enough that the second stream, which acks at once, never times out on a loaded machine.
  options_.ack_timeout = absl::Seconds(3);
  Connect([](int stream, Stream& io) {
    v1::VitalsBatch batch;
    if (stream == 1) {
      while (io.Read(&batch)) {
      }  // no ack; Read ends when the client cancels
      return grpc::Status::OK;
    }
    while (io.Read(&batch)) io.Write(Stored(batch));
    return grpc::Status::OK;
  });
  ASSERT_TRUE(client_->Send(Samples(1)).ok());
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  DeviceStats stats = client_->stats();
  EXPECT_EQ(stats.ack_timeouts, 1u);
  EXPECT_EQ(stats.batches_sent, 2u);
  EXPECT_EQ(stats.batches_acked, 1u);
  EXPECT_EQ(ingest_->streams(), 2);
}

// The server holds seqs above every one this buffer gave out (an earlier buffer file was lost):
// the batch's samples were taken for duplicates. If the buffer cannot be rewritten with them
// sealed again (here its temporary file cannot be made), the batch stays in the file, to be sent
// again: the ack is not recorded on its own first. Nor is it counted, however often it is sent.
TEST_F(DeviceClientTest, ASeqRestartThatCannotBeWrittenKeepsTheBatchInTheFile) {
  options_.first_seq = 1;
  Connect(AnswerAsHeldAboveEverySeq);
  ASSERT_TRUE(client_->Send(Samples(3)).ok());
  std::filesystem::create_directory(options_.buffer_path + ".tmp");
  client_->Start();
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (client_->stats().batches_sent < 3 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  client_->Stop();
  std::filesystem::remove(options_.buffer_path + ".tmp");
  const DeviceStats stats = client_->stats();
  ASSERT_GE(stats.batches_sent, 3u);
  EXPECT_EQ(stats.seq_restarts, 0u);
  EXPECT_EQ(stats.batches_acked, 0u);
  EXPECT_EQ(stats.samples_stored, 0u);
  EXPECT_EQ(stats.samples_duplicate, 0u);
  EXPECT_EQ(client_->pending(), 1u);
  client_.reset();  // the buffer file is the client's while it lives
  auto reopened = BatchBuffer::Open(options_.buffer_path, 10);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  ASSERT_EQ((*reopened)->pending().size(), 1u);
  EXPECT_EQ((*reopened)->pending()[0].batch_seq(), 1u);
  EXPECT_EQ((*reopened)->pending()[0].samples_size(), 3);
}

// While the buffer cannot take a server's answer (here: a seq restart, whose rewrite cannot be
// made), the batch goes again after a backoff that grows, as after any failed stream: with the
// backoff started over after each answer, it went every 0-1 ms here, for as long as the disk
// stayed full. Growing from 1 ms, the waits come to about a second after a dozen sends; at most
// 40 sends in 1.5 s allows for jitter that draws short waits, and is far under what a backoff
// stuck at 1 ms sends (hundreds).
TEST_F(DeviceClientTest, ABufferThatCannotTakeTheAnswerGetsABackoffThatGrows) {
  options_.first_seq = 1;
  options_.backoff_max = absl::Hours(1);
  Connect(AnswerAsHeldAboveEverySeq);
  ASSERT_TRUE(client_->Send(Samples(3)).ok());
  std::filesystem::create_directory(options_.buffer_path + ".tmp");
  client_->Start();
  absl::SleepFor(absl::Milliseconds(1500));
  const DeviceStats stats = client_->stats();
  client_->Stop();
  std::filesystem::remove(options_.buffer_path + ".tmp");
  EXPECT_GE(stats.batches_sent, 1u);
  EXPECT_LE(stats.batches_sent, 40u);
  EXPECT_EQ(stats.batches_acked, 0u);
  EXPECT_EQ(client_->pending(), 1u);
}

// A device's samples as a server with a cursor stores them: a sample at or below the device's
// highest stored seq is a duplicate. Each stored sample's value, with its seq.
class CursorServer {
 public:
  explicit CursorServer(uint64_t cursor) : cursor_(cursor) {}

  v1::IngestAck Store(const v1::VitalsBatch& batch) {
    std::lock_guard<std::mutex> lock(mu_);
    v1::IngestAck ack;
    ack.set_batch_seq(batch.batch_seq());
    for (const v1::VitalSample& s : batch.samples()) {
      if (s.seq() <= cursor_) {
        ack.set_duplicate_count(ack.duplicate_count() + 1);
        continue;
      }
      cursor_ = s.seq();
      stored_.emplace_back(s.value(), s.seq());
      ack.set_stored_count(ack.stored_count() + 1);
    }
    ack.set_highest_committed_seq(cursor_);
    return ack;
  }

  std::vector<std::pair<double, uint64_t>> stored() {
    std::lock_guard<std::mutex> lock(mu_);
    return stored_;
  }

 private:
  std::mutex mu_;
  uint64_t cursor_;
  std::vector<std::pair<double, uint64_t>> stored_;
};

// The device's earlier buffer file was lost after seqs 1-3 were stored; the new one starts at 1
// again. Its first batch (seqs 1-10) straddles the server's cursor: 1-3 are taken for duplicates,
// 4-10 stored. The batch was never sent before, so its duplicates are not a resend's: those
// samples go again above the cursor, and every sample is stored once.
TEST_F(DeviceClientTest, ABatchStraddlingTheServersCursorOnItsFirstSendLosesNothing) {
  options_.first_seq = 1;
  CursorServer server(/*cursor=*/3);
  Connect([&server](int, Stream& io) {
    v1::VitalsBatch batch;
    while (io.Read(&batch)) io.Write(server.Store(batch));
    return grpc::Status::OK;
  });
  std::vector<v1::VitalSample> samples = Samples(10);
  for (int i = 0; i < 10; ++i) samples[static_cast<size_t>(i)].set_value(100 + i);
  ASSERT_TRUE(client_->Send(std::move(samples)).ok());
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  client_->Stop();
  std::map<double, int> times_stored;
  for (const auto& [value, seq] : server.stored()) ++times_stored[value];
  EXPECT_EQ(times_stored.size(), 10u);
  for (const auto& [value, times] : times_stored) EXPECT_EQ(times, 1) << value;
  const DeviceStats stats = client_->stats();
  EXPECT_EQ(stats.samples_stored, 10u);
  EXPECT_EQ(stats.samples_duplicate, 0u);
  EXPECT_EQ(stats.seq_restarts, 1u);
}

// A batch stored whose ack was lost (the connection broke) is sent again, and the server takes
// all of it for duplicates: rightly, it has them. They are not sent again under new seqs.
TEST_F(DeviceClientTest, AResendOfAStoredBatchIsNotStoredTwice) {
  options_.first_seq = 1;
  CursorServer server(/*cursor=*/0);
  Connect([&server](int stream, Stream& io) {
    v1::VitalsBatch batch;
    if (stream == 1) {
      if (io.Read(&batch)) server.Store(batch);  // stored, never acked
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "connection reset");
    }
    while (io.Read(&batch)) io.Write(server.Store(batch));
    return grpc::Status::OK;
  });
  std::vector<v1::VitalSample> samples = Samples(4);
  for (int i = 0; i < 4; ++i) samples[static_cast<size_t>(i)].set_value(100 + i);
  ASSERT_TRUE(client_->Send(std::move(samples)).ok());
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  client_->Stop();
  EXPECT_EQ(server.stored().size(), 4u);
  const DeviceStats stats = client_->stats();
  EXPECT_EQ(stats.samples_duplicate, 4u);
  EXPECT_EQ(stats.seq_restarts, 0u);
  EXPECT_GE(stats.batches_sent, 2u);
}

// A batch written to a stream but not acked when the device process ends (stored, its ack lost
// with the connection) is still in the buffer file: the next process sends it again, the
// server's cursor takes the resend for duplicates, and it is stored once.
TEST_F(DeviceClientTest, ABatchSentButNotAckedIsResentByTheNextProcess) {
  options_.first_seq = 1;
  CursorServer server(/*cursor=*/0);
  std::atomic<bool> answer{false};
  Connect([&server, &answer](int, Stream& io) {
    v1::VitalsBatch batch;
    while (io.Read(&batch)) {
      v1::IngestAck stored = server.Store(batch);
      if (!answer.load()) {
        return grpc::Status(grpc::StatusCode::UNAVAILABLE, "connection reset after commit");
      }
      io.Write(stored);
    }
    return grpc::Status::OK;
  });
  std::vector<v1::VitalSample> samples = Samples(4);
  for (int i = 0; i < 4; ++i) samples[static_cast<size_t>(i)].set_value(100 + i);
  ASSERT_TRUE(client_->Send(std::move(samples)).ok());
  client_->Start();
  ASSERT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(20),
                                      [&] { return server.stored().size() == 4; }));
  client_.reset();  // the device process ends; its buffer file stays
  {
    auto file = BatchBuffer::Open(options_.buffer_path, 10);
    ASSERT_TRUE(file.ok()) << file.status();
    ASSERT_EQ((*file)->pending().size(), 1u);
  }
  answer = true;
  auto next = DeviceClient::Open(
      options_, grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_),
                                    grpc::InsecureChannelCredentials()));
  ASSERT_TRUE(next.ok()) << next.status();
  client_ = *std::move(next);
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  client_->Stop();
  const std::vector<std::pair<double, uint64_t>> stored = server.stored();
  ASSERT_EQ(stored.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(stored[i].first, 100.0 + static_cast<double>(i));
    EXPECT_EQ(stored[i].second, i + 1);
  }
  const DeviceStats stats = client_->stats();
  EXPECT_EQ(stats.batches_acked, 1u);
  EXPECT_EQ(stats.samples_stored, 0u);
  EXPECT_EQ(stats.samples_duplicate, 4u);
  EXPECT_EQ(client_->pending(), 0u);
}

// A server whose streams fail at random (a batch stored but its ack lost with the connection, a
// batch not stored and the stream ended, a retryable ack, a slow ack) and a device process
// restarted at random while it sends: once every batch is acked, every sample is stored, and
// none twice. Seeded (MEDGATE_FUZZ_SEED and MEDGATE_FUZZ_ROUNDS); where a failure falls among a
// stream's batches is the machine's timing.
TEST_F(DeviceClientTest, RandomStreamFailuresAndRestartsLoseNothingAndStoreNothingTwice) {
  options_.first_seq = 1;
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(4);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::filesystem::remove(options_.buffer_path);
    CursorServer store(/*cursor=*/0);
    std::mutex rng_mu;
    std::mt19937_64 server_rng = testing::FuzzRng(seed, round);
    std::mt19937_64 device_rng = testing::FuzzRng(seed + 1, round);
    auto draw = [&](uint64_t lo, uint64_t hi) {
      std::lock_guard<std::mutex> lock(rng_mu);
      return testing::Uniform(server_rng, lo, hi);
    };
    std::atomic<int> lost_acks{0};
    FakeIngest ingest([&](int, Stream& io) {
      v1::VitalsBatch batch;
      while (io.Read(&batch)) {
        switch (draw(0, 9)) {
          case 0:
            store.Store(batch);
            lost_acks.fetch_add(1);
            return grpc::Status(grpc::StatusCode::UNAVAILABLE, "connection reset after commit");
          case 1:
            return grpc::Status(grpc::StatusCode::UNAVAILABLE, "connection reset");
          case 2: {
            v1::IngestAck retry;
            retry.set_batch_seq(batch.batch_seq());
            retry.mutable_retryable_error()->set_code(grpc::StatusCode::UNAVAILABLE);
            retry.mutable_retryable_error()->set_message("region down");
            retry.mutable_retry_after()->set_nanos(1000000);
            io.Write(retry);
            break;
          }
          case 3:
            absl::SleepFor(absl::Milliseconds(static_cast<int64_t>(draw(1, 5))));
            io.Write(store.Store(batch));
            break;
          default:
            io.Write(store.Store(batch));
            break;
        }
      }
      return grpc::Status::OK;
    });
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&ingest);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    ASSERT_NE(server, nullptr);
    auto open = [&] {
      auto client = DeviceClient::Open(
          options_, grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                        grpc::InsecureChannelCredentials()));
      EXPECT_TRUE(client.ok()) << client.status();
      return client.ok() ? *std::move(client) : nullptr;
    };
    std::unique_ptr<DeviceClient> client = open();
    ASSERT_NE(client, nullptr);
    client->Start();
    constexpr int kBatches = 30;
    std::multiset<double> sent;
    int restarts = 0;
    for (int b = 0; b < kBatches; ++b) {
      std::vector<v1::VitalSample> samples =
          Samples(static_cast<int>(testing::Uniform(device_rng, 1, 5)));
      for (size_t i = 0; i < samples.size(); ++i) {
        samples[i].set_value(b * 100 + static_cast<double>(i));
        sent.insert(samples[i].value());
      }
      ASSERT_TRUE(client->Send(std::move(samples)).ok());
      if (testing::Uniform(device_rng, 0, 6) == 0) {
        absl::SleepFor(absl::Microseconds(testing::Uniform(device_rng, 0, 3000)));
        client.reset();  // the device process ends; its buffer file stays
        client = open();
        ASSERT_NE(client, nullptr);
        client->Start();
        ++restarts;
      }
    }
    ASSERT_TRUE(client->WaitUntilAcked(absl::Seconds(60)).ok());
    client.reset();
    server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    std::multiset<double> stored;
    for (const auto& [value, seq] : store.stored()) stored.insert(value);
    EXPECT_EQ(stored, sent) << restarts << " restarts, " << lost_acks.load() << " acks lost";
    if (HasFailure()) break;
  }
}

// What a server's retry_after asks is waited on top of the jitter, not instead of it: devices a
// server told alike still come back at different times.
TEST(ReconnectWaitTest, AddsTheJitterToTheServersRetryAfter) {
  const absl::Duration max = absl::Seconds(30);
  EXPECT_EQ(ReconnectWait(absl::Milliseconds(300), absl::Seconds(1), max),
            absl::Milliseconds(1300));
  EXPECT_NE(ReconnectWait(absl::Milliseconds(10), absl::Seconds(1), max),
            ReconnectWait(absl::Milliseconds(700), absl::Seconds(1), max));
  // Without retry_after, the jitter alone; a retry_after past backoff_max counts as backoff_max.
  EXPECT_EQ(ReconnectWait(absl::Milliseconds(300), absl::ZeroDuration(), max),
            absl::Milliseconds(300));
  EXPECT_EQ(ReconnectWait(absl::Milliseconds(300), absl::Hours(1), max),
            max + absl::Milliseconds(300));
}

// A buffer file that cannot be opened (here: a symlink loop) is an error naming it; no exception
// leaves Open.
TEST_F(DeviceClientTest, OpenReportsABufferFileThatCannotBeOpened) {
  std::filesystem::create_symlink(options_.buffer_path, options_.buffer_path);
  absl::Status status = DeviceClient::Open(options_).status();
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find(options_.buffer_path), absl::string_view::npos) << status;
  EXPECT_NE(status.message().find(std::strerror(ELOOP)), absl::string_view::npos) << status;
}

// Not positive, the watchdog would give up every stream at once; over a day (an infinite one),
// its deadline would overflow.
TEST_F(DeviceClientTest, OpenRefusesAnAckTimeoutThatIsNotPositiveOrOverADay) {
  for (absl::Duration timeout :
       {absl::ZeroDuration(), absl::Hours(24) + absl::Seconds(1), absl::InfiniteDuration()}) {
    options_.ack_timeout = timeout;
    absl::Status status = DeviceClient::Open(options_).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << timeout;
    EXPECT_NE(status.message().find("ack_timeout"), absl::string_view::npos) << status;
  }
  options_.ack_timeout = absl::Hours(24);
  EXPECT_TRUE(DeviceClient::Open(options_).ok());
}

// A backoff of zero would reconnect in a tight loop against a server that refuses the device.
TEST_F(DeviceClientTest, OpenRefusesABackoffThatCouldSpin) {
  DeviceOptions zero = options_;
  zero.backoff_initial = absl::ZeroDuration();
  absl::Status status = DeviceClient::Open(zero).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("backoff_initial"), absl::string_view::npos) << status;
  DeviceOptions inverted = options_;
  inverted.backoff_initial = absl::Seconds(2);
  inverted.backoff_max = absl::Seconds(1);
  status = DeviceClient::Open(inverted).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("backoff_max"), absl::string_view::npos) << status;
  // An infinite backoff_max would overflow the jittered wait.
  for (absl::Duration longest : {absl::Hours(24) + absl::Seconds(1), absl::InfiniteDuration()}) {
    DeviceOptions endless = options_;
    endless.backoff_max = longest;
    status = DeviceClient::Open(endless).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << longest;
    EXPECT_NE(status.message().find("backoff_max must be at most 24h"), absl::string_view::npos)
        << status;
  }
}

// Bounds of zero would refuse every Send; a first seq the service refuses (above the largest
// signed 64-bit integer) would have every sample rejected, and dropped.
TEST_F(DeviceClientTest, OpenRefusesBoundsOfZeroAndAFirstSeqTheServiceRefuses) {
  for (auto zero : {&DeviceOptions::max_buffered_batches, &DeviceOptions::max_buffered_bytes}) {
    DeviceOptions options = options_;
    options.*zero = 0;
    absl::Status status = DeviceClient::Open(options).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_NE(status.message().find("must be positive"), absl::string_view::npos) << status;
  }
  DeviceOptions too_high = options_;
  too_high.first_seq = uint64_t{1} << 63;
  absl::Status status = DeviceClient::Open(too_high).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find("first_seq must be at most 9223372036854775807"),
            absl::string_view::npos)
      << status;
  too_high.first_seq = (uint64_t{1} << 63) - 1;
  EXPECT_TRUE(DeviceClient::Open(too_high).ok());
}

// The SDK's own channel reconnects within the SDK's backoff: with gRPC's (up to 2 minutes), its
// streams would fail at once for that long after a server came back.
TEST_F(DeviceClientTest, TheChannelReconnectsWithinTheBackoff) {
  options_.backoff_initial = absl::Milliseconds(250);
  options_.backoff_max = absl::Seconds(7);
  const ChannelOptions channel = DeviceChannelOptions(options_);
  EXPECT_EQ(channel.reconnect_backoff_initial, absl::Milliseconds(250));
  EXPECT_EQ(channel.reconnect_backoff_max, absl::Seconds(7));
  EXPECT_FALSE(channel.bdp_probe);
  EXPECT_GT(channel.keepalive_time, absl::ZeroDuration());
}

// Without the server's identity the SDK could not tell the ingest service from any other
// certificate the CA signed.
TEST_F(DeviceClientTest, OpenRefusesAMissingServerIdentity) {
  for (const char* identity : {"", "ingest"}) {
    DeviceOptions options = options_;
    options.server_identity = identity;
    absl::Status status = DeviceClient::Open(options).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << identity;
    EXPECT_NE(status.message().find("server_identity"), absl::string_view::npos) << status;
  }
}

// Send refuses a batch while the unacked ones hold max_buffered_bytes, and takes it once they are
// acked.
TEST_F(DeviceClientTest, SendIsBoundedByTheBufferedBytes) {
  options_.max_buffered_bytes = 2048;
  Connect([](int, Stream& io) {
    v1::VitalsBatch batch;
    while (io.Read(&batch)) io.Write(Stored(batch));
    return grpc::Status::OK;
  });
  int taken = 0;
  absl::StatusOr<uint64_t> sent;
  while ((sent = client_->Send(Samples(10))).ok()) ++taken;
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kResourceExhausted) << sent.status();
  EXPECT_NE(sent.status().message().find("past its 2048 bytes"), absl::string_view::npos)
      << sent.status();
  EXPECT_GE(taken, 1);
  EXPECT_LT(taken, 2048 / 10);  // each sample is more than 10 bytes serialized
  EXPECT_EQ(client_->pending(), static_cast<size_t>(taken));
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  EXPECT_TRUE(client_->Send(Samples(10)).ok());
}

// A compaction of the buffer file that fails (no room for the new file; a directory stands in
// its place here) leaves the file as it was and the stream as it was: the client does not end
// its stream after every later ack, and WaitUntilAcked hears of every ack.
TEST_F(DeviceClientTest, AFailedCompactionOfTheBufferKeepsTheStream) {
  options_.max_buffered_batches = 2000;
  Connect([](int, Stream& io) {
    v1::VitalsBatch batch;
    while (io.Read(&batch)) io.Write(Stored(batch));
    return grpc::Status::OK;
  });
  constexpr int kBatches = 1100;  // more than the acks that start a compaction
  for (int i = 0; i < kBatches; ++i) ASSERT_TRUE(client_->Send(Samples(1)).ok());
  ASSERT_TRUE(std::filesystem::create_directory(options_.buffer_path + ".tmp"));
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(60)).ok());
  client_->Stop();
  std::filesystem::remove(options_.buffer_path + ".tmp");
  const DeviceStats stats = client_->stats();
  EXPECT_EQ(stats.batches_acked, static_cast<uint64_t>(kBatches));
  EXPECT_EQ(ingest_->streams(), 1);
  EXPECT_GE(stats.buffer_compaction_failures, 1u);
  EXPECT_FALSE(stats.last_buffer_compaction_error.empty());
}

// An ack naming another batch than the one in flight changes nothing in the buffer: that other
// batch is still sent, and the one in flight is sent again.
TEST_F(DeviceClientTest, AnAckForAnotherBatchLosesNothing) {
  std::mutex mu;
  std::set<uint64_t> stored;
  Connect([&](int stream, Stream& io) {
    v1::VitalsBatch batch;
    bool first = stream == 1;
    while (io.Read(&batch)) {
      v1::IngestAck ack = Stored(batch);
      if (first) {
        ack.set_batch_seq(batch.batch_seq() + 1);  // batch 2's ack, for batch 1
        first = false;
      } else {
        std::lock_guard<std::mutex> lock(mu);
        stored.insert(batch.batch_seq());
      }
      io.Write(ack);
    }
    return grpc::Status::OK;
  });
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(client_->Send(Samples(1)).ok());
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  client_->Stop();
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_EQ(stored, (std::set<uint64_t>{1, 2, 3}));
  EXPECT_GE(ingest_->streams(), 2);
}

// Nor do counts that are not the batch's: the batch goes again.
TEST_F(DeviceClientTest, AnAckWhoseCountsAreNotTheBatchsLosesNothing) {
  std::atomic<int> acked{0};
  Connect([&](int stream, Stream& io) {
    v1::VitalsBatch batch;
    while (io.Read(&batch)) {
      v1::IngestAck ack = Stored(batch);
      if (stream == 1) ack.set_duplicate_count(3);  // 3 samples more than the batch has
      if (stream > 1) ++acked;
      io.Write(ack);
    }
    return grpc::Status::OK;
  });
  ASSERT_TRUE(client_->Send(Samples(2)).ok());
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  client_->Stop();
  EXPECT_EQ(acked.load(), 1);
  EXPECT_EQ(client_->stats().samples_stored, 2u);
}

// WaitUntilAcked(InfiniteDuration()) waits for the acks (a wait_for of it overflowed and
// returned at once).
TEST_F(DeviceClientTest, WaitingWithoutATimeoutWaitsForTheAcks) {
  std::atomic<bool> serve{false};
  Connect([&](int, Stream& io) {
    v1::VitalsBatch batch;
    while (io.Read(&batch)) {
      while (!serve.load()) absl::SleepFor(absl::Milliseconds(5));
      io.Write(Stored(batch));
    }
    return grpc::Status::OK;
  });
  ASSERT_TRUE(client_->Send(Samples(1)).ok());
  client_->Start();
  absl::Status waited = absl::UnknownError("not returned");
  std::atomic<bool> entered{false};
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    entered = true;
    waited = client_->WaitUntilAcked(absl::InfiniteDuration());
    returned = true;
  });
  // The wait has begun (or is about to): a wait that returned at once has returned well within
  // the 200 ms after.
  EXPECT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(30), [&] { return entered.load(); }));
  absl::SleepFor(absl::Milliseconds(200));
  const bool returned_before_the_ack = returned.load();
  serve = true;
  waiter.join();
  EXPECT_FALSE(returned_before_the_ack) << waited;
  EXPECT_TRUE(waited.ok()) << waited;
}

// Why streams end is in the stats: a refusal retried at the backoff would otherwise look like
// being offline.
TEST_F(DeviceClientTest, TheStatsSayWhyAStreamEnded) {
  Connect([](int stream, Stream& io) {
    v1::VitalsBatch batch;
    if (stream == 1) {
      io.Read(&batch);
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "device dev-1 is not assigned");
    }
    while (io.Read(&batch)) io.Write(Stored(batch));
    return grpc::Status::OK;
  });
  ASSERT_TRUE(client_->Send(Samples(1)).ok());
  client_->Start();
  ASSERT_TRUE(client_->WaitUntilAcked(absl::Seconds(20)).ok());
  client_->Stop();
  const DeviceStats stats = client_->stats();
  EXPECT_GE(stats.stream_failures, 1u);
  EXPECT_NE(stats.last_stream_error.find("PERMISSION_DENIED"), std::string::npos)
      << stats.last_stream_error;
  EXPECT_NE(stats.last_stream_error.find("not assigned"), std::string::npos)
      << stats.last_stream_error;
}

// Stop() from a callback (the sender's own thread) stops the sender once the callback returns,
// instead of joining its own thread (which threw and terminated the process).
TEST_F(DeviceClientTest, StopFromACallbackStopsTheSender) {
  std::atomic<int> streamed{0};
  Connect([&](int, Stream& io) {
    v1::VitalsBatch batch;
    while (io.Read(&batch)) {
      ++streamed;
      io.Write(Stored(batch));
    }
    return grpc::Status::OK;
  });
  std::atomic<bool> called{false};
  client_->OnAck([&](const v1::IngestAck&, absl::Duration) {
    client_->Stop();
    called = true;
  });
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(client_->Send(Samples(1)).ok());
  client_->Start();
  ASSERT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(20), [&] { return called.load(); }));
  client_->Stop();  // from here, waits for the sender
  EXPECT_EQ(streamed.load(), 1);
  EXPECT_EQ(client_->pending(), 2u);
  EXPECT_EQ(client_->stats().batches_acked, 1u);
}

}  // namespace
}  // namespace medgate::device
