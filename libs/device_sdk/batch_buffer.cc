// The device's durable buffer of unacknowledged batches.
#include "libs/device_sdk/batch_buffer.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"

namespace medgate::device {
namespace {

constexpr uint8_t kBatch = 1;
constexpr uint8_t kAck = 2;
constexpr uint8_t kCounters = 3;
constexpr uint32_t kMaxRecord = 64 << 20;
constexpr size_t kRewriteAfterAcks = 1024;

std::string U64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((v >> (56 - 8 * i)) & 0xff);
  return out;
}

uint64_t ReadU64(const std::string& s, size_t at) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8; ++i) v = (v << 8) | static_cast<unsigned char>(s[at + i]);
  return v;
}

}  // namespace

absl::StatusOr<std::unique_ptr<BatchBuffer>> BatchBuffer::Open(const std::string& path,
                                                               size_t max_batches) {
  std::unique_ptr<BatchBuffer> buffer(new BatchBuffer(path, max_batches));
  if (absl::Status s = buffer->Load(); !s.ok()) return s;
  if (absl::Status s = buffer->Rewrite(); !s.ok()) return s;
  return buffer;
}

BatchBuffer::~BatchBuffer() {
  if (file_ != nullptr) std::fclose(file_);
}

absl::Status BatchBuffer::Load() {
  std::FILE* in = std::fopen(path_.c_str(), "rb");
  if (in == nullptr) return absl::OkStatus();  // a new device
  while (true) {
    unsigned char header[5];
    if (std::fread(header, 1, 5, in) != 5) break;
    uint32_t length = (uint32_t{header[0]} << 24) | (uint32_t{header[1]} << 16) |
                      (uint32_t{header[2]} << 8) | uint32_t{header[3]};
    if (length > kMaxRecord) break;
    std::string payload(length, '\0');
    if (std::fread(payload.data(), 1, length, in) != length) break;  // torn tail
    if (header[4] == kBatch) {
      v1::VitalsBatch batch;
      if (!batch.ParseFromString(payload)) break;
      next_batch_seq_ = std::max(next_batch_seq_, batch.batch_seq() + 1);
      for (const auto& s : batch.samples()) next_seq_ = std::max(next_seq_, s.seq() + 1);
      pending_.push_back(std::move(batch));
    } else if (header[4] == kAck && length == 8) {
      uint64_t acked = ReadU64(payload, 0);
      pending_.erase(std::remove_if(pending_.begin(), pending_.end(),
                                    [&](const v1::VitalsBatch& b) { return b.batch_seq() == acked; }),
                     pending_.end());
    } else if (header[4] == kCounters && length == 16) {
      next_seq_ = std::max(next_seq_, ReadU64(payload, 0));
      next_batch_seq_ = std::max(next_batch_seq_, ReadU64(payload, 8));
    } else {
      break;
    }
  }
  std::fclose(in);
  return absl::OkStatus();
}

absl::Status BatchBuffer::Rewrite() {
  std::string tmp = path_ + ".tmp";
  if (file_ != nullptr) {
    std::fclose(file_);
    file_ = nullptr;
  }
  file_ = std::fopen(tmp.c_str(), "wb");
  if (file_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("cannot write buffer file '", tmp, "': ",
                                                      std::strerror(errno)));
  }
  if (absl::Status s = Append(kCounters, U64(next_seq_) + U64(next_batch_seq_)); !s.ok()) return s;
  for (const v1::VitalsBatch& b : pending_) {
    if (absl::Status s = Append(kBatch, b.SerializeAsString()); !s.ok()) return s;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path_, ec);
  if (ec) return absl::FailedPreconditionError(absl::StrCat("cannot replace '", path_, "'"));
  acked_since_rewrite_ = 0;
  return absl::OkStatus();
}

absl::Status BatchBuffer::Append(uint8_t type, const std::string& payload) {
  unsigned char header[5] = {static_cast<unsigned char>(payload.size() >> 24),
                             static_cast<unsigned char>(payload.size() >> 16),
                             static_cast<unsigned char>(payload.size() >> 8),
                             static_cast<unsigned char>(payload.size()), type};
  if (std::fwrite(header, 1, 5, file_) != 5 ||
      std::fwrite(payload.data(), 1, payload.size(), file_) != payload.size() ||
      std::fflush(file_) != 0 || fsync(fileno(file_)) != 0) {
    return absl::DataLossError(absl::StrCat("cannot append to buffer file '", path_, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> BatchBuffer::Seal(v1::VitalsBatch batch) {
  if (pending_.size() >= max_batches_) {
    return absl::ResourceExhaustedError(
        absl::StrCat(pending_.size(), " batches are waiting for acks; the buffer is full"));
  }
  batch.set_batch_seq(next_batch_seq_);
  for (auto& s : *batch.mutable_samples()) s.set_seq(next_seq_++);
  ++next_batch_seq_;
  if (absl::Status s = Append(kBatch, batch.SerializeAsString()); !s.ok()) return s;
  pending_.push_back(std::move(batch));
  return pending_.back().batch_seq();
}

absl::Status BatchBuffer::Ack(uint64_t batch_seq) {
  auto it = std::find_if(pending_.begin(), pending_.end(),
                         [&](const v1::VitalsBatch& b) { return b.batch_seq() == batch_seq; });
  if (it == pending_.end()) return absl::OkStatus();  // already acked
  pending_.erase(it);
  if (absl::Status s = Append(kAck, U64(batch_seq)); !s.ok()) return s;
  if (++acked_since_rewrite_ >= kRewriteAfterAcks) return Rewrite();
  return absl::OkStatus();
}

}  // namespace medgate::device
