// The device's durable buffer of unacknowledged batches.
#include "libs/device_sdk/batch_buffer.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>

#include <google/protobuf/unknown_field_set.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "libs/common/status_macros.h"
#include "libs/crypto/sha256.h"

namespace medgate::device {
namespace {

// A batch's batch_seq and highest sample seq, read from its wire format without checking its
// strings (VitalsBatch: batch_seq = 1, samples = 2; VitalSample: seq = 1).
struct SeqsRead {
  uint64_t batch_seq = 0;
  uint64_t max_seq = 0;
};

std::optional<SeqsRead> ReadSeqsOnly(const std::string& payload) {
  using google::protobuf::UnknownField;
  google::protobuf::UnknownFieldSet fields;
  if (!fields.ParseFromString(payload)) return std::nullopt;
  SeqsRead out;
  for (int i = 0; i < fields.field_count(); ++i) {
    const UnknownField& field = fields.field(i);
    if (field.number() == 1 && field.type() == UnknownField::TYPE_VARINT) {
      out.batch_seq = field.varint();
    } else if (field.number() == 2 && field.type() == UnknownField::TYPE_LENGTH_DELIMITED) {
      google::protobuf::UnknownFieldSet sample;
      if (!sample.ParseFromString(field.length_delimited())) return std::nullopt;
      for (int k = 0; k < sample.field_count(); ++k) {
        if (sample.field(k).number() == 1 && sample.field(k).type() == UnknownField::TYPE_VARINT) {
          out.max_seq = std::max(out.max_seq, sample.field(k).varint());
        }
      }
    }
  }
  if (out.batch_seq == 0) return std::nullopt;
  return out;
}

constexpr uint8_t kBatch = 1;
constexpr uint8_t kAck = 2;
constexpr uint8_t kCounters = 3;
// On the type of a record with sums. Every record written has them; a file of records without
// them was written before they were, and is read as such.
constexpr uint8_t kChecked = 0x80;
constexpr size_t kHeader = 5;          // [u32 length][u8 type]
constexpr size_t kCheckedHeader = 13;  // ... [u32 header sum][u32 payload sum]
constexpr uint32_t kMaxRecord = 64 << 20;
// The unit a disk writes whole: a write torn by a power loss leaves whole sectors unwritten.
constexpr uint64_t kSector = 512;
// A torn append leaves at most one record unwritten: a batch of at most kMaxBatchBytes (one sealed
// again after a seq restart may be a little larger). Zeros over more than this at the end of the
// file are records lost after they were written: damage, reported, not a torn tail.
constexpr uint64_t kMaxTornSpan = kCheckedHeader + 2 * kMaxBatchBytes;
// Zeros at the end of a record that make it a torn one: fewer could end a damaged record by chance.
constexpr size_t kMinTornZeros = 8;
constexpr size_t kRewriteAfterAcks = 1024;
constexpr size_t kRewriteAfterAcksAtLeast = 16;

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

uint32_t ReadU32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

void PutU32(std::string& out, uint32_t v) {
  for (int shift : {24, 16, 8, 0}) out.push_back(static_cast<char>(v >> shift));
}

// The first 4 bytes of the SHA-256 of `data`: tells a damaged record from a whole one.
uint32_t Sum(absl::string_view data) {
  const std::string digest = crypto::Sha256::Of(data);
  return ReadU32(reinterpret_cast<const unsigned char*>(digest.data()));
}

std::string Record(uint8_t type, const std::string& payload) {
  std::string record;
  record.reserve(kCheckedHeader + payload.size());
  PutU32(record, static_cast<uint32_t>(payload.size()));
  record.push_back(static_cast<char>(type | kChecked));
  // The length has a sum of its own: a damaged length would otherwise make a record in the middle
  // of the file run past its end, like a torn last record, and everything after it would be lost
  // without a word.
  PutU32(record, Sum(record));
  PutU32(record, Sum(payload));
  record += payload;
  return record;
}

// False (errno set) unless all of `data` is written at `offset`.
bool WriteAt(int fd, absl::string_view data, uint64_t offset) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n =
        pwrite(fd, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// Whether `payload`, whose last byte is the file's last (the file ends at offset `end`), ends in
// zeros from the start of a disk sector on: the sectors of a write torn by a power loss that never
// reached the disk read as zeros once the file had grown.
bool EndsInUnwrittenSectors(const std::string& payload, uint64_t end) {
  size_t zeros = 0;
  while (zeros < payload.size() && payload[payload.size() - 1 - zeros] == 0) ++zeros;
  if (zeros < kMinTornZeros) return false;
  const uint64_t first_zero = end - zeros;
  return (first_zero + kSector - 1) / kSector * kSector < end;
}

// Creates `path` for writing, readable and writable by its owner only (it holds patients'
// vitals, locations included), whatever the umask. Exclusively: a file or symbolic link already
// there is an error, never followed or overwritten, so a link planted in a shared directory cannot
// make the buffer write over another file.
int CreateOwnerOnly(const std::string& path) {
  return open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
}

}  // namespace

absl::StatusOr<std::unique_ptr<BatchBuffer>> BatchBuffer::Open(const std::string& path,
                                                               size_t max_batches,
                                                               uint64_t first_seq,
                                                               size_t max_bytes) {
  std::unique_ptr<BatchBuffer> buffer(new BatchBuffer(path, max_batches, max_bytes));
  RETURN_IF_ERROR(buffer->Lock());
  ASSIGN_OR_RETURN(const bool found, buffer->Load());
  buffer->RecountPendingBytes();
  if (!buffer->damaged_copy_.empty() || !found) {
    // A damaged file is replaced by what could be read of it (its bytes kept aside); a new
    // device starts its file. Neither can go on without a rewrite. Both start their seqs at
    // first_seq at least: seqs given out before (by a file that was lost, or after the damage)
    // are not known.
    buffer->next_seq_ = std::max(buffer->next_seq_, std::max<uint64_t>(first_seq, 1));
    RETURN_IF_ERROR(buffer->Rewrite());
    return buffer;
  }
  if (buffer->torn_last_record_) {
    // Its seqs may have been given out, if the record was whole once and was damaged since: the
    // seqs go on from first_seq at least, as after damage.
    buffer->next_seq_ = std::max(buffer->next_seq_, first_seq);
  }
  if (buffer->Replace(buffer->pending_, buffer->next_seq_, buffer->next_batch_seq_).ok()) {
    // Compacted: from here on the buffer is on the new file, whether or not the rename can be
    // made durable.
    RETURN_IF_ERROR(buffer->SyncDirectory());
    return buffer;
  }
  // No room to compact (a full disk): appends go on at the end of the file as it is, past a torn
  // last record if any, so the device keeps what it buffered and can still send it.
  const int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot write buffer file '", path, "': ",
                                                      std::strerror(errno)));
  }
  buffer->fd_ = fd;
  buffer->size_ = buffer->loaded_bytes_;
  buffer->truncate_owed_ = true;
  return buffer;
}

BatchBuffer::~BatchBuffer() {
  if (fd_ >= 0) close(fd_);
  if (lock_fd_ >= 0) close(lock_fd_);  // releases the lock
}

absl::Status BatchBuffer::Lock() {
  // Not on the buffer file: every compaction renames a new file over it, and a lock on the old
  // one would let a second process in. The lock file is never removed either: a process could
  // hold a lock on the removed file while another one locks a new file of the same name.
  const std::string lock_path = path_ + ".lock";
  lock_fd_ = open(lock_path.c_str(), O_RDONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (lock_fd_ < 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot lock buffer file '", path_,
                                                      "': cannot open '", lock_path, "': ",
                                                      std::strerror(errno)));
  }
  if (flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    if (error == EWOULDBLOCK) {
      return absl::FailedPreconditionError(
          absl::StrCat("buffer file '", path_, "' is in use: another process holds its lock '",
                       lock_path, "'"));
    }
    return absl::FailedPreconditionError(absl::StrCat("cannot lock buffer file '", path_, "' ('",
                                                      lock_path, "'): ", std::strerror(error)));
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> BatchBuffer::Load() {
  std::FILE* in = std::fopen(path_.c_str(), "rb");
  if (in == nullptr) {
    const int error = errno;
    if (error == ENOENT) return false;  // a new device
    // Anything else (no permission, a symlink loop, an I/O error) is a file that may hold
    // batches never acked: taken for a new device, it would be replaced by an empty buffer.
    return absl::FailedPreconditionError(absl::StrCat("cannot open buffer file '", path_, "': ",
                                                      std::strerror(error)));
  }
  // A short read is the end of the file, or a torn last record, only when it is not an error: a
  // read error taken for the end would compact the file to the records before it.
  auto read_error = [&] {
    const int error = errno;
    std::fclose(in);
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot read buffer file '", path_, "' after ", loaded_bytes_, " bytes: ",
        std::strerror(error)));
  };
  struct stat st;
  const int64_t file_size = fstat(fileno(in), &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
  // False when the record read is not one this buffer writes: the file is damaged there.
  bool readable = true;
  // Whether that record's header was read whole, its sum right: its extent is known, and bytes
  // after it are records written after it (a torn append leaves nothing behind it).
  bool extent_known = false;
  // Records without sums never follow one with them (the buffer writes only these now): one
  // that does is a damaged type byte.
  bool checked_seen = false;
  while (true) {
    unsigned char header[kCheckedHeader];
    if (std::fread(header, 1, kHeader, in) != kHeader) {
      if (std::ferror(in)) return read_error();
      break;  // the end, or a torn last record
    }
    const uint32_t length = ReadU32(header);
    const bool checked = (header[4] & kChecked) != 0;
    const uint8_t type = header[4] & static_cast<uint8_t>(~kChecked);
    size_t header_size = kHeader;
    if (checked) {
      header_size = kCheckedHeader;
      if (std::fread(header + kHeader, 1, kCheckedHeader - kHeader, in) !=
          kCheckedHeader - kHeader) {
        if (std::ferror(in)) return read_error();
        break;  // a torn last record
      }
      if (ReadU32(header + kHeader) !=
          Sum(absl::string_view(reinterpret_cast<const char*>(header), kHeader))) {
        readable = false;
        break;
      }
    } else if (checked_seen) {
      readable = false;
      break;
    }
    // A type or length this buffer never writes is damage, found before the payload is read: in
    // a record without sums (a damaged type byte reads as one) a damaged length would otherwise
    // run past the end of the file and be taken for a torn last record.
    const bool known = (type == kBatch && length <= kMaxRecord) || (type == kAck && length == 8) ||
                       (type == kCounters && length == 16);
    if (!known) {
      readable = false;
      extent_known = checked;
      break;
    }
    std::string payload(length, '\0');
    if (std::fread(payload.data(), 1, length, in) != length) {
      if (std::ferror(in)) return read_error();
      break;  // a torn last record (with sums: its length is the one written)
    }
    if (checked && ReadU32(header + kHeader + 4) != Sum(payload)) {
      // A last record whose payload is zeros, or ends in zeroed sectors, though its length is
      // right: the write was torn after the file grew (a filesystem may show the blocks that did
      // not reach the disk zeroed after a power loss). A torn tail like a short one, not damage:
      // nothing follows it to keep aside. Other bytes there (a record damaged after it was
      // written whole) are damage.
      const uint64_t end = loaded_bytes_ + header_size + length;
      if (file_size >= 0 && end == static_cast<uint64_t>(file_size) &&
          (std::all_of(payload.begin(), payload.end(), [](char b) { return b == 0; }) ||
           EndsInUnwrittenSectors(payload, end))) {
        torn_last_record_ = true;
        break;
      }
      readable = false;
      extent_known = true;
      break;
    }
    if (type == kBatch) {
      v1::VitalsBatch batch;
      if (!batch.ParseFromString(payload)) {
        std::optional<SeqsRead> seqs;
        if (checked) seqs = ReadSeqsOnly(payload);
        if (!seqs) {
          readable = false;
          break;
        }
        // Whole, as its sums say, yet not a batch the parser reads (a string that is not
        // UTF-8): not damage. Dropped, as no server could read it; its seqs are not given again.
        ++unreadable_batches_;
        next_batch_seq_ = std::max(next_batch_seq_, seqs->batch_seq + 1);
        next_seq_ = std::max(next_seq_, seqs->max_seq + 1);
        checked_seen = true;
        loaded_bytes_ += header_size + length;
        continue;
      }
      next_batch_seq_ = std::max(next_batch_seq_, batch.batch_seq() + 1);
      for (const auto& s : batch.samples()) next_seq_ = std::max(next_seq_, s.seq() + 1);
      pending_.push_back(std::move(batch));
    } else if (type == kAck) {
      Forget(ReadU64(payload, 0));
    } else {
      next_seq_ = std::max(next_seq_, ReadU64(payload, 0));
      next_batch_seq_ = std::max(next_batch_seq_, ReadU64(payload, 8));
    }
    checked_seen = checked_seen || checked;
    loaded_bytes_ += header_size + length;
  }
  if (!readable && !extent_known && file_size >= 0 &&
      static_cast<uint64_t>(file_size) - loaded_bytes_ <= kMaxTornSpan) {
    // Zeros from the end of the sector the failed record starts in (or sooner) to the end of the
    // file, over no more than one record: a last record of which at most that sector reached the
    // disk (the file grew; its other blocks did not). Its header, cut at the sector's end or
    // never written, could not be read. (A record whose header reads whole, zeroed before its
    // end, with bytes after it, is damage: those bytes are records appended after it was synced.)
    std::string tail(static_cast<size_t>(file_size) - loaded_bytes_, '\0');
    if (fseeko(in, static_cast<off_t>(loaded_bytes_), SEEK_SET) != 0 ||
        std::fread(tail.data(), 1, tail.size(), in) != tail.size()) {
      return read_error();
    }
    size_t written = tail.size();
    while (written > 0 && tail[written - 1] == 0) --written;
    const uint64_t first_sector_end = (loaded_bytes_ / kSector + 1) * kSector;
    // The sector either reached the disk, with the record's bytes to its end (the last few may
    // be zeros of their own), or did not, and the record is all zeros. Zeros from the middle of
    // the sector on are not what a torn write leaves: damage.
    if (written < tail.size() && loaded_bytes_ + written <= first_sector_end &&
        (written == 0 || first_sector_end - (loaded_bytes_ + written) < kMinTornZeros)) {
      readable = true;
      torn_last_record_ = true;
    }
  }
  std::fclose(in);
  if (!readable && !checked_seen && loaded_bytes_ > 0) {
    // Damage after records without sums only: nothing read can be trusted, as a damaged type
    // byte reads a record with sums as one without, its sums as its payload (a counters record
    // gave a next seq of its sums' bytes). The buffer starts empty; the file is kept aside.
    pending_.clear();
    next_seq_ = 1;
    next_batch_seq_ = 1;
  }
  if (!readable) RETURN_IF_ERROR(KeepDamagedCopy());
  return true;
}

absl::Status BatchBuffer::KeepDamagedCopy() {
  // What follows the damage cannot be told apart from garbage (no record says where the next
  // one starts): the whole file is kept aside, for the device maker's support to recover the
  // batches after it, before the buffer is rewritten with those before it. The copy is made
  // durable (its bytes and its name) first: the rewrite's rename is the end of the original.
  damaged_copy_ = absl::StrCat(path_, ".damaged-", absl::ToUnixSeconds(absl::Now()));
  auto cannot_keep = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat("buffer file '", path_, "' is damaged after ",
                                            loaded_bytes_, " bytes and cannot be kept aside as '",
                                            damaged_copy_, "': ", why));
  };
  // A name of its own: an earlier damage's copy of the same second is kept too.
  int out = CreateOwnerOnly(damaged_copy_);
  for (int n = 2; out < 0 && errno == EEXIST && n <= 100; ++n) {
    damaged_copy_ = absl::StrCat(path_, ".damaged-", absl::ToUnixSeconds(absl::Now()), "-", n);
    out = CreateOwnerOnly(damaged_copy_);
  }
  if (out < 0) return cannot_keep(std::strerror(errno));
  const int in = open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  bool copied = in >= 0;
  std::string chunk(1 << 16, '\0');
  uint64_t at = 0;
  while (copied) {
    const ssize_t n = read(in, chunk.data(), chunk.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      copied = n == 0;
      break;
    }
    copied = WriteAt(out, absl::string_view(chunk.data(), static_cast<size_t>(n)), at);
    at += static_cast<uint64_t>(n);
  }
  const int failed = errno;
  if (in >= 0) close(in);
  if (!copied || fsync(out) != 0) {
    const int error = copied ? errno : failed;
    close(out);
    return cannot_keep(std::strerror(error));
  }
  close(out);
  if (absl::Status synced = SyncDirectory(); !synced.ok()) {
    return cannot_keep(std::string(synced.message()));
  }
  return absl::OkStatus();
}

absl::Status BatchBuffer::Rewrite() {
  RETURN_IF_ERROR(Replace(pending_, next_seq_, next_batch_seq_));
  return SyncDirectory();
}

absl::Status BatchBuffer::Replace(const std::deque<v1::VitalsBatch>& pending, uint64_t next_seq,
                                  uint64_t next_batch_seq) {
  const std::string tmp = path_ + ".tmp";
  // A rewrite's leftover (the process stopped before its rename) goes first; only this process,
  // holding the lock, writes that name.
  unlink(tmp.c_str());
  const int fd = CreateOwnerOnly(tmp);
  if (fd < 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot write buffer file '", tmp, "': ",
                                                      std::strerror(errno)));
  }
  // Until the rename succeeds the buffer stays on the file it has: appends keep going there.
  auto abandon = [&](absl::string_view what) {
    const int error = errno;
    close(fd);
    unlink(tmp.c_str());
    return absl::DataLossError(
        absl::StrCat("cannot ", what, " buffer file '", tmp, "': ", std::strerror(error)));
  };
  uint64_t size = 0;
  auto write = [&](uint8_t type, const std::string& payload) {
    const std::string record = Record(type, payload);
    if (!WriteAt(fd, record, size)) return false;
    size += record.size();
    return true;
  };
  if (!write(kCounters, U64(next_seq) + U64(next_batch_seq))) return abandon("write");
  for (const v1::VitalsBatch& b : pending) {
    if (!write(kBatch, b.SerializeAsString())) return abandon("write");
  }
  if (fsync(fd) != 0) return abandon("sync");
  if (std::rename(tmp.c_str(), path_.c_str()) != 0) return abandon("rename");
  dir_sync_owed_ = true;
  if (fd_ >= 0) close(fd_);
  fd_ = fd;
  size_ = size;
  truncate_owed_ = false;
  acked_since_rewrite_ = 0;
  acked_bytes_since_rewrite_ = 0;
  return absl::OkStatus();
}

absl::Status BatchBuffer::SyncDirectory() {
  // The rename is durable only with its directory: a power loss could otherwise bring back the
  // old file, without what is appended to the new one from now on.
  std::filesystem::path parent = std::filesystem::path(path_).parent_path();
  if (parent.empty()) parent = std::filesystem::path(".");
  const std::string dir = parent.string();
  const int dir_fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0 || fsync(dir_fd) != 0) {
    const int error = errno;
    if (dir_fd >= 0) close(dir_fd);
    return absl::DataLossError(
        absl::StrCat("cannot sync directory '", dir, "': ", std::strerror(error)));
  }
  close(dir_fd);
  dir_sync_owed_ = false;
  return absl::OkStatus();
}

absl::Status BatchBuffer::Append(uint8_t type, const std::string& payload) {
  // Before the record is written: one reported as failed must not come back after a restart.
  if (dir_sync_owed_) {
    if (absl::Status synced = SyncDirectory(); !synced.ok()) {
      return absl::DataLossError(absl::StrCat("buffer file '", path_,
                                              "' was replaced and the rename is not durable: ",
                                              synced.message()));
    }
  }
  // Load stops at the first bad record: bytes of a failed append left in the file would hide
  // every record appended after them.
  if (truncate_owed_) {
    if (ftruncate(fd_, static_cast<off_t>(size_)) != 0) {
      return absl::DataLossError(absl::StrCat("cannot truncate buffer file '", path_,
                                              "': ", std::strerror(errno)));
    }
    truncate_owed_ = false;
  }
  const std::string record = Record(type, payload);
  if (!WriteAt(fd_, record, size_) || fsync(fd_) != 0) {
    const int error = errno;
    truncate_owed_ = ftruncate(fd_, static_cast<off_t>(size_)) != 0;
    return absl::DataLossError(absl::StrCat("cannot append to buffer file '", path_,
                                            "': ", std::strerror(error)));
  }
  size_ += record.size();
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> BatchBuffer::Seal(v1::VitalsBatch batch) {
  if (pending_.size() >= max_batches_) {
    return absl::ResourceExhaustedError(
        absl::StrCat(pending_.size(), " batches are waiting for acks; the buffer is full"));
  }
  // The seqs are the buffer's once the batch is in the file: a batch refused here, or whose
  // append fails, leaves them to the next one.
  uint64_t next_seq = next_seq_;
  batch.set_batch_seq(next_batch_seq_);
  for (auto& s : *batch.mutable_samples()) s.set_seq(next_seq++);
  const std::string payload = batch.SerializeAsString();
  if (!pending_.empty() && pending_bytes_ + payload.size() > max_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        pending_.size(), " batches of ", pending_bytes_, " bytes are waiting for acks; this one's ",
        payload.size(), " would take the buffer past its ", max_bytes_, " bytes"));
  }
  next_seq_ = next_seq;
  ++next_batch_seq_;
  if (absl::Status s = Append(kBatch, payload); !s.ok()) return s;
  pending_bytes_ += payload.size();
  pending_.push_back(std::move(batch));
  return pending_.back().batch_seq();
}

void BatchBuffer::RecountPendingBytes() {
  pending_bytes_ = 0;
  for (const v1::VitalsBatch& b : pending_) pending_bytes_ += b.ByteSizeLong();
}

absl::Status BatchBuffer::RestartSeqsAbove(uint64_t acked_batch_seq, uint64_t committed,
                                           std::vector<v1::VitalSample> unstored) {
  // Built aside and taken only once the file holds it: memory gone ahead of a failed rewrite
  // would send samples under seqs the file does not have, and after a restart of the device
  // process the file would send them again under their old ones, to be stored twice.
  std::deque<v1::VitalsBatch> pending;
  for (const v1::VitalsBatch& b : pending_) {
    if (b.batch_seq() != acked_batch_seq) pending.push_back(b);
  }
  uint64_t next_seq = std::max(next_seq_, committed + 1);
  uint64_t next_batch_seq = next_batch_seq_;
  for (v1::VitalsBatch& b : pending) {
    for (auto& s : *b.mutable_samples()) s.set_seq(next_seq++);
  }
  if (!unstored.empty()) {
    v1::VitalsBatch again;
    again.set_batch_seq(next_batch_seq++);
    for (v1::VitalSample& s : unstored) {
      s.set_seq(next_seq++);
      *again.add_samples() = std::move(s);
    }
    pending.push_back(std::move(again));
  }
  RETURN_IF_ERROR(Replace(pending, next_seq, next_batch_seq));
  // The file has the new state now, even if its rename cannot be made durable: so has memory.
  pending_ = std::move(pending);
  RecountPendingBytes();
  next_seq_ = next_seq;
  next_batch_seq_ = next_batch_seq;
  return SyncDirectory();
}

bool BatchBuffer::Forget(uint64_t batch_seq) {
  auto it = std::find_if(pending_.begin(), pending_.end(),
                         [&](const v1::VitalsBatch& b) { return b.batch_seq() == batch_seq; });
  if (it == pending_.end()) return false;
  pending_bytes_ -= std::min(pending_bytes_, it->ByteSizeLong());
  pending_.erase(it);
  return true;
}

absl::Status BatchBuffer::Ack(uint64_t batch_seq) {
  const size_t pending_before = pending_bytes_;
  if (!Forget(batch_seq)) return absl::OkStatus();  // already acked
  if (absl::Status s = Append(kAck, U64(batch_seq)); !s.ok()) return s;
  acked_bytes_since_rewrite_ += pending_before - pending_bytes_;
  // A small bound compacts sooner: the file holds at most max(max_batches, 16) acked batches, and
  // a bound of 1 or 2 does not rewrite the file at every ack. Large batches compact sooner too:
  // the acked ones the file holds come to at most max_bytes and a batch, as the unacked ones do.
  if (++acked_since_rewrite_ <
          std::min(kRewriteAfterAcks, std::max(max_batches_, kRewriteAfterAcksAtLeast)) &&
      acked_bytes_since_rewrite_ < max_bytes_) {
    return absl::OkStatus();
  }
  absl::Status compacted = Rewrite();
  // The ack is durable already. A compaction that left the file as it was (no room for the new
  // one) is tried again after as many acks; one whose rename is not durable yet stops appends
  // until it is, and is the caller's error.
  if (compacted.ok() || dir_sync_owed_) return compacted;
  acked_since_rewrite_ = 0;
  acked_bytes_since_rewrite_ = 0;
  ++compaction_failures_;
  last_compaction_error_ = std::string(compacted.message());
  return absl::OkStatus();
}

}  // namespace medgate::device
