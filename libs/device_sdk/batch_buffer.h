// The device's durable buffer of unacknowledged batches: an append-only file that survives a
// restart of the device process, so nothing unacknowledged is lost.
#ifndef MEDGATE_LIBS_DEVICE_SDK_BATCH_BUFFER_H_
#define MEDGATE_LIBS_DEVICE_SDK_BATCH_BUFFER_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "medgate/v1/ingest.pb.h"

namespace medgate::device {

// The largest batch DeviceClient::Send accepts: the API's bounds on samples and on a batch's
// message size (proto/medgate/v1/ingest.proto). A larger batch buffered by an older SDK is refused
// as a whole by the server (DeviceClient::OnRejected).
inline constexpr size_t kMaxSamplesPerBatch = 1000;
inline constexpr size_t kMaxBatchBytes = 256 << 10;
// The unacked batches a buffer holds at most, serialized, unless told otherwise: they are in the
// device's memory as well as in its file.
inline constexpr size_t kDefaultMaxBufferedBytes = 64 << 20;

// Records: [u32 length][u8 type][u32 header sum][u32 payload sum][payload], each sum the first
// 4 bytes of the SHA-256 of the length and type, and of the payload; the type has its high bit
// set. Files written before the sums ([u32 length][u8 type][payload]) are still read, and
// rewritten with them when opened; damage in such a file before any record with sums leaves
// nothing of it trusted (a damaged type byte reads a record with sums as one without). Types: a
// sealed batch (VitalsBatch), an ack of a batch_seq, and the counters (next sample seq, next batch
// seq) written when the file is compacted; any other type or length is damage. A torn last record
// (power loss mid-write: its header or payload runs past the end of the file; its payload, of the
// right length, is zeros or ends in zeroed sectors; or, its header not readable, the file is zeros
// from the record's start or from the end of the sector it starts in, less at most 7 zeros of its
// own, over no more than one batch) is ignored on load; any other record whose sums do not match
// is damage. A write that fails leaves nothing of its record
// behind, so a failure never hides the records appended after it. One process at a time has a
// file: the buffer holds an flock on "<path>.lock" while it lives.
class BatchBuffer {
 public:
  // Opens (creating if missing) and replays `path`; compacts it to the unacked batches. A file
  // damaged before its end (not a torn last record) is copied aside first (damaged_copy()) and
  // the buffer keeps the batches before the damage. A compaction that fails (a full disk) leaves
  // the file as it is, and appends go on at its end; one whose rename cannot be made durable (the
  // directory cannot be synced) is an error.
  // A new file's first sample seq is `first_seq`; a damaged file's next seq is at least
  // `first_seq` (the seqs given out after the damage are not known). Only a missing file is a
  // new one: a file that cannot be opened or read (FAILED_PRECONDITION, naming it and why) is
  // left as it is. A file another BatchBuffer holds (another process) is FAILED_PRECONDITION:
  // both would give out the same seqs, and one's compaction would rename over the other's file.
  // A file holding more than `max_batches` or `max_bytes` keeps them all: Seal refuses new batches
  // until acks bring the buffer under its bounds.
  static absl::StatusOr<std::unique_ptr<BatchBuffer>> Open(
      const std::string& path, size_t max_batches, uint64_t first_seq = 1,
      size_t max_bytes = kDefaultMaxBufferedBytes);
  ~BatchBuffer();

  // Assigns the next batch_seq and sample seqs to `batch`, and makes it durable (fsync).
  // RESOURCE_EXHAUSTED, and nothing sealed, when max_batches are already waiting for acks, or when
  // the batch would take the unacked batches' serialized bytes past max_bytes (a batch alone in the
  // buffer is always taken).
  absl::StatusOr<uint64_t> Seal(v1::VitalsBatch batch);
  // Records the ack of `batch_seq` (the batch leaves the buffer). Every 1,024 acks, or every
  // max(max_batches, 16) acks when that is fewer, and whenever the batches acked since the last
  // compaction come to max_bytes, the file is compacted: it holds at most that many acked batches,
  // of at most max_bytes and one batch, besides the unacked ones. A compaction that fails keeps the file it had,
  // is counted (compaction_failures()) and tried again as many acks later; the ack is recorded
  // all the same. An error after the ack is recorded comes from a compaction whose rename could
  // not be made durable.
  absl::Status Ack(uint64_t batch_seq);

  // For a server that holds seqs this buffer never gave out (`committed`, the device's highest
  // stored seq, is at or above next_seq()): the device's earlier buffer file was lost or replaced,
  // so this one's seqs started over below what is stored and its samples would be taken for
  // duplicates. Every seq it gave out is at or below `committed`, so none of its samples was
  // stored. The acked batch `acked_batch_seq` leaves the buffer; `unstored` (its samples that were
  // taken for duplicates) is sealed again as a new batch; the pending batches get new seqs above
  // `committed`. All of it in one rewrite of the file: a crash or a failed write leaves the file
  // as it was, the acked batch still in it to be sent (and taken for duplicates) again; a failed
  // write leaves the buffer in memory as it was too, so it goes on sending what the file holds.
  absl::Status RestartSeqsAbove(uint64_t acked_batch_seq, uint64_t committed,
                                std::vector<v1::VitalSample> unstored);

  // The unacked batches, oldest first.
  const std::deque<v1::VitalsBatch>& pending() const { return pending_; }
  // Their serialized bytes.
  size_t pending_bytes() const { return pending_bytes_; }
  uint64_t next_seq() const { return next_seq_; }
  // Where Open kept a damaged file's bytes; empty when the file was whole.
  const std::string& damaged_copy() const { return damaged_copy_; }
  // Batches Open found whole (their sums match) but could not read as batches, and dropped: ones
  // sealed with a string that is not UTF-8, before DeviceClient::Send checked them, which no
  // server could read either. The file goes on after them, and their seqs are not given again.
  uint64_t unreadable_batches() const { return unreadable_batches_; }
  // Compactions that failed and left the file as it was, and why the last one failed.
  uint64_t compaction_failures() const { return compaction_failures_; }
  const std::string& last_compaction_error() const { return last_compaction_error_; }

 private:
  BatchBuffer(std::string path, size_t max_batches, size_t max_bytes)
      : path_(std::move(path)), max_batches_(max_batches), max_bytes_(max_bytes) {}
  // pending_bytes_ counted again, after pending_ was replaced.
  void RecountPendingBytes();
  // Takes the lock on path_ + ".lock" for the buffer's lifetime.
  absl::Status Lock();
  // Replays the file into memory; false when there is none (a new device).
  absl::StatusOr<bool> Load();
  // Copies the damaged file aside to damaged_copy_, durably, before it is replaced.
  absl::Status KeepDamagedCopy();
  // Replace() with the buffer's own counters and pending batches, then SyncDirectory().
  absl::Status Rewrite();
  // Writes `next_seq`, `next_batch_seq` and `pending` to a new file and renames it over `path_`;
  // appends go to the new file from then on. An error leaves the buffer on its file as it was.
  // The counters and batches in memory are the caller's to update.
  absl::Status Replace(const std::deque<v1::VitalsBatch>& pending, uint64_t next_seq,
                       uint64_t next_batch_seq);
  // Makes the last Replace's rename durable; until it succeeds, appends fail (dir_sync_owed_).
  absl::Status SyncDirectory();
  // Appends a record and makes it durable: with the last rename (a record on a file that a power
  // loss could take back is not).
  absl::Status Append(uint8_t type, const std::string& payload);
  // Takes batch `batch_seq` out of pending_ (in memory only); false if it was not there.
  bool Forget(uint64_t batch_seq);

  const std::string path_;
  const size_t max_batches_;
  const size_t max_bytes_;
  int lock_fd_ = -1;
  int fd_ = -1;
  uint64_t size_ = 0;            // where the last durable record of `fd_` ends
  bool truncate_owed_ = false;   // a failed append's bytes may still follow size_
  bool dir_sync_owed_ = false;   // the last rename is not durable yet
  std::deque<v1::VitalsBatch> pending_;
  size_t pending_bytes_ = 0;  // pending_'s, serialized
  uint64_t next_seq_ = 1;
  uint64_t next_batch_seq_ = 1;
  size_t acked_since_rewrite_ = 0;
  size_t acked_bytes_since_rewrite_ = 0;  // serialized, of the batches acked since
  uint64_t loaded_bytes_ = 0;  // where the last whole record Load read ends
  bool torn_last_record_ = false;  // Load found a last record of the right length but not whole
  std::string damaged_copy_;
  uint64_t unreadable_batches_ = 0;
  uint64_t compaction_failures_ = 0;
  std::string last_compaction_error_;
};

}  // namespace medgate::device

#endif  // MEDGATE_LIBS_DEVICE_SDK_BATCH_BUFFER_H_
