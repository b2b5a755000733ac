// The per-region COPY writer.
#include "services/ingest/vitals_writer.h"

#include <libpq-fe.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "libs/common/log.h"
#include "libs/pg/conninfo.h"
#include "libs/pg/pg_status.h"
#include "libs/pg/sql_array.h"
#include "services/ingest/sql.h"

namespace medgate::ingest {
namespace {

using DeviceKey = std::pair<std::string, std::string>;

// Queued requests that make a transaction worth committing without lingering for more.
constexpr size_t kEnoughToCommit = 64;

// PostgreSQL's binary COPY format: big-endian fields, timestamps in microseconds since 2000-01-01.
constexpr int64_t kPgEpochMicros = 946684800LL * 1000000;

void PutU16(std::string& b, uint16_t v) {
  b.push_back(static_cast<char>(v >> 8));
  b.push_back(static_cast<char>(v));
}
void PutU32(std::string& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<char>(v >> s));
}
void PutU64(std::string& b, uint64_t v) {
  for (int s = 56; s >= 0; s -= 8) b.push_back(static_cast<char>(v >> s));
}
void PutText(std::string& b, const std::string& s) {
  PutU32(b, static_cast<uint32_t>(s.size()));
  b.append(s);
}
void PutInt64(std::string& b, int64_t v) {
  PutU32(b, 8);
  PutU64(b, static_cast<uint64_t>(v));
}
void PutDouble(std::string& b, double d) {
  uint64_t v;
  std::memcpy(&v, &d, sizeof(v));
  PutU32(b, 8);
  PutU64(b, v);
}
void PutNull(std::string& b) { PutU32(b, 0xffffffffu); }

// Maps a failed libpq result (or a broken connection) to a Status.
absl::Status ResultStatus(PGconn* conn, PGresult* result) {
  if (PQstatus(conn) == CONNECTION_BAD) {
    return absl::UnavailableError(absl::StrCat("database unreachable: ", PQerrorMessage(conn)));
  }
  const char* state = result != nullptr ? PQresultErrorField(result, PG_DIAG_SQLSTATE) : nullptr;
  const char* message = result != nullptr ? PQresultErrorMessage(result) : PQerrorMessage(conn);
  return pg::StatusFromSqlState(state != nullptr ? state : "XX000", message);
}

// Runs a statement with text parameters; OK when its result has the expected status.
absl::StatusOr<PGresult*> Exec(PGconn* conn, const char* sql, std::vector<std::string> params,
                               ExecStatusType expected) {
  std::vector<const char*> values;
  for (const std::string& p : params) values.push_back(p.c_str());
  PGresult* result = PQexecParams(conn, sql, static_cast<int>(values.size()), nullptr,
                                  values.data(), nullptr, nullptr, 0);
  if (PQresultStatus(result) != expected) {
    absl::Status status = ResultStatus(conn, result);
    PQclear(result);
    return status;
  }
  return result;
}

}  // namespace

VitalsWriter::VitalsWriter(std::string region_id, DbConfig db, WriterOptions options)
    : region_id_(std::move(region_id)),
      db_(std::move(db)),
      watch_([this] {
        return pg::AcceptsConnections(pg::WithConnectionDefaults(db_.conninfo),
                                      pg::kServerAnswersWithin);
      }),
      options_(options) {
  thread_ = std::thread([this] { Loop(); });
}

VitalsWriter::~VitalsWriter() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  room_cv_.notify_all();
  thread_.join();
  if (conn_ != nullptr) PQfinish(conn_);
}

absl::Status VitalsWriter::EnsureConnected() {
  if (conn_ != nullptr && PQstatus(conn_) == CONNECTION_OK) return absl::OkStatus();
  if (conn_ != nullptr) PQfinish(conn_);
  conn_ = PQconnectdb(pg::WithConnectionDefaults(db_.conninfo).c_str());
  if (PQstatus(conn_) != CONNECTION_OK) {
    absl::Status status = absl::UnavailableError(
        absl::StrCat("database '", region_id_, "' unreachable"));
    PQfinish(conn_);
    conn_ = nullptr;
    return status;
  }
  pg::StatementWatch::Scope watch(watch_, PQsocket(conn_),
                                  pg::UnansweredLimit(absl::Milliseconds(db_.statement_timeout_ms)),
                                  pg::StatementWatch::Scope::Limit::kSinceLastAnswer);
  // A session this writer's host left inside a transaction (the host gone between its two round
  // trips) holds its devices' cursors: the server ends it after the idle timeout.
  for (const std::string& setting :
       {absl::StrCat("SET statement_timeout = ", db_.statement_timeout_ms),
        absl::StrCat("SET idle_in_transaction_session_timeout = ",
                     absl::ToInt64Milliseconds(pg::IdleInTransactionTimeout(
                         absl::Milliseconds(db_.statement_timeout_ms))))}) {
    absl::StatusOr<PGresult*> setup = Exec(conn_, setting.c_str(), {}, PGRES_COMMAND_OK);
    if (!setup.ok()) {
      // Not kept: the next attempt starts from a new connection rather than one without its
      // timeouts.
      PQfinish(conn_);
      conn_ = nullptr;
      return watch.fired() ? NotAnswering() : setup.status();
    }
    PQclear(*setup);
  }
  if (watch.fired()) {
    PQfinish(conn_);
    conn_ = nullptr;
    return NotAnswering();
  }
  return absl::OkStatus();
}

absl::Status VitalsWriter::NotAnswering() const {
  // Not UNAVAILABLE: Commit does not try again on a new connection, which would wait as long.
  return absl::DeadlineExceededError(absl::StrCat(
      "database '", region_id_, "' did not answer within ",
      absl::FormatDuration(pg::UnansweredLimit(absl::Milliseconds(db_.statement_timeout_ms)))));
}

bool VitalsWriter::HasRoomFor(size_t rows) const {
  return queue_.size() < options_.max_queued_requests &&
         (queue_.empty() || queued_rows_ + rows <= options_.max_queued_rows);
}

bool VitalsWriter::Enqueue(WriteRequest request, absl::Duration wait) {
  std::unique_lock<std::mutex> lock(mu_);
  ++waiting_for_room_;
  const size_t rows = request.rows.size();
  const bool room = room_cv_.wait_for(lock, absl::ToChronoMilliseconds(wait), [this, rows] {
    return stopping_ || HasRoomFor(rows);
  });
  --waiting_for_room_;
  if (!room || stopping_) return false;
  PushAndUnlock(std::move(request), lock);
  return true;
}

bool VitalsWriter::TryEnqueue(WriteRequest& request) {
  std::unique_lock<std::mutex> lock(mu_);
  // Room freed while others wait for it is theirs: taking it here would leave them waiting out
  // enqueue_wait while later batches go ahead.
  if (stopping_ || waiting_for_room_ > 0 || !HasRoomFor(request.rows.size())) return false;
  PushAndUnlock(std::move(request), lock);
  return true;
}

void VitalsWriter::PushAndUnlock(WriteRequest request, std::unique_lock<std::mutex>& lock) {
  queued_rows_ += request.rows.size();
  queue_.push_back(std::move(request));
  // The writer sleeps only on an empty queue or while lingering for kEnoughToCommit requests:
  // waking it for any other arrival would cost a context switch per batch for nothing.
  const bool wake = queue_.size() == 1 || queue_.size() == kEnoughToCommit;
  lock.unlock();
  if (wake) work_cv_.notify_one();
}

size_t VitalsWriter::queued() {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size();
}

uint64_t VitalsWriter::groups_taken() {
  std::lock_guard<std::mutex> lock(mu_);
  return groups_taken_;
}

void VitalsWriter::Loop() {
  while (true) {
    std::vector<WriteRequest> group;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty() && stopping_) break;
      // Give concurrent streams a moment to add to this transaction, unless it is already large.
      if (queue_.size() < kEnoughToCommit && !stopping_) {
        work_cv_.wait_for(lock, absl::ToChronoMicroseconds(options_.linger),
                          [this] { return stopping_ || queue_.size() >= kEnoughToCommit; });
      }
      size_t rows = 0;
      while (!queue_.empty() && (group.empty() || rows + queue_.front().rows.size() <=
                                                      options_.max_rows_per_transaction)) {
        rows += queue_.front().rows.size();
        queued_rows_ -= queue_.front().rows.size();
        group.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      if (!group.empty()) ++groups_taken_;
    }
    room_cv_.notify_all();
    Commit(group);
  }
  // Whatever is still queued at shutdown was not written: tell its streams to retry.
  std::deque<WriteRequest> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(queue_);
    queued_rows_ = 0;
  }
  for (WriteRequest& r : left) {
    r.done(WriteOutcome{absl::UnavailableError("ingest is shutting down; resend"), 0, 0, 0});
  }
}

void VitalsWriter::TakeOutStale(std::vector<WriteRequest*>& live) {
  // A stream that already failed must not write later batches (it would leave a seq gap).
  // Kept requests are compacted in place: nothing is allocated unless some are too old.
  std::vector<WriteRequest*> too_old;  // answered once the warning below is written
  const absl::Time now = absl::Now();
  size_t kept = 0;
  for (WriteRequest* r : live) {
    if (r->poisoned && r->poisoned->load()) {
      r->done(WriteOutcome{absl::UnavailableError(
          "this stream stores nothing more after a batch it sent was not stored; reconnect and resend"),
                          0, 0, 0});
    } else if (now - r->read_at > options_.max_batch_wait) {
      // Decided (consent, the device's patient) too long ago to be stored on that decision.
      // Its stream's later batches, in this group too, are not written (no seq gap).
      if (r->poisoned) r->poisoned->store(true);
      too_old.push_back(r);
    } else {
      live[kept++] = r;
    }
  }
  live.resize(kept);
  // At most a line a second: a shard that stays slow would otherwise log every transaction.
  too_old_unlogged_ += too_old.size();
  if (uint64_t held_back = 0;
      too_old_unlogged_ > 0 && too_old_log_.Allow(now, held_back)) {
    log::Warning("vitals_batches_waited_too_long",
                 {{"region", region_id_}, {"batches", too_old_unlogged_},
                  {"bound_ms", absl::ToInt64Milliseconds(options_.max_batch_wait)}});
    too_old_unlogged_ = 0;
  }
  for (WriteRequest* r : too_old) {
    r->done(WriteOutcome{
        absl::UnavailableError(absl::StrCat(
            "the batch waited ",
            absl::FormatDuration(absl::Trunc(now - r->read_at, absl::Milliseconds(1))),
            " for region ", region_id_, "'s writer, more than its bound of ",
            absl::FormatDuration(options_.max_batch_wait),
            ": nothing of it was stored; resend it (its consent is checked again)")),
        0, 0, 0});
  }
}

void VitalsWriter::Commit(std::vector<WriteRequest>& group) {
  std::vector<WriteRequest*> live;
  live.reserve(group.size());
  for (WriteRequest& r : group) live.push_back(&r);

  std::vector<WriteOutcome> outcomes;
  absl::Status status;
  for (int attempt = 0; attempt < 2; ++attempt) {
    bool commit_sent = false;
    // Stale requests are taken out where the transaction starts, once connected: the bound on a
    // batch's wait counts the connecting too (up to the connect timeout, again for a second
    // attempt). One look a transaction.
    status = EnsureConnected();
    if (status.ok()) {
      TakeOutStale(live);
      if (live.empty()) return;
      status = WriteOnce(live, outcomes, commit_sent);
    }
    // A stale connection (server restarted) fails before anything is written: retry once. Not
    // once the COMMIT was sent: it may have happened, and a second transaction would answer the
    // stored samples as duplicates and write a refusal's entry twice.
    if (status.ok() || status.code() != absl::StatusCode::kUnavailable || attempt > 0 ||
        commit_sent) {
      break;
    }
    if (conn_ != nullptr && PQstatus(conn_) == CONNECTION_OK) break;
  }
  if (!status.ok()) {
    log::Warning("vitals_write_failed", {{"region", region_id_}, {"batches", live.size()},
                                         {"error", status.message()}});
    for (WriteRequest* r : live) {
      if (r->poisoned) r->poisoned->store(true);
      r->done(WriteOutcome{absl::UnavailableError(absl::StrCat("region ", region_id_,
                                                               " could not store the batch; resend")),
                           0, 0, 0});
    }
    return;
  }
  for (size_t i = 0; i < live.size(); ++i) live[i]->done(outcomes[i]);
}

absl::Status VitalsWriter::WriteOnce(const std::vector<WriteRequest*>& live,
                                     std::vector<WriteOutcome>& outcomes, bool& commit_sent) {
  outcomes.assign(live.size(), WriteOutcome{});
  // Connected by Commit.
  pg::StatementWatch::Scope watch(watch_, PQsocket(conn_),
                                  pg::UnansweredLimit(absl::Milliseconds(db_.statement_timeout_ms)),
                                  pg::StatementWatch::Scope::Limit::kSinceLastAnswer);
  bool in_transaction = false;
  auto fail = [&](absl::Status status) {
    if (watch.fired()) {
      // Its socket is shut: nothing more can be asked on it, and the commit, if sent, is in
      // doubt (the batches are answered "resend"; a resend is deduplicated by the cursor).
      PQfinish(conn_);
      conn_ = nullptr;
      return NotAnswering();
    }
    // Read what the query string still answers; a COPY left open is ended as failed first.
    while (PGresult* extra = PQgetResult(conn_)) {
      const bool copy_open = PQresultStatus(extra) == PGRES_COPY_IN;
      PQclear(extra);
      if (copy_open && PQputCopyEnd(conn_, "the writer gave up on this transaction") != 1) break;
    }
    if (in_transaction && PQstatus(conn_) == CONNECTION_OK) PQclear(PQexec(conn_, "ROLLBACK"));
    if (PQstatus(conn_) != CONNECTION_OK) {
      PQfinish(conn_);
      conn_ = nullptr;
    }
    return status;
  };
  const absl::Time began = absl::Now();

  // The devices of this transaction, in key order, with the highest seq each brings (a batch's
  // rows come in increasing seq order: validation refuses any other).
  std::map<DeviceKey, int64_t> highest;
  for (WriteRequest* w : live) {
    int64_t& h = highest[{w->tenant_id, w->device_id}];
    if (!w->rows.empty()) h = std::max(h, static_cast<int64_t>(w->rows.back().seq));
  }
  std::vector<std::string> tenants;
  std::vector<std::string> devices;
  std::vector<std::string> max_seqs;
  for (const auto& [key, seq] : highest) {
    tenants.push_back(key.first);
    devices.push_back(key.second);
    max_seqs.push_back(absl::StrCat(seq));
  }
  auto quote = [this](const std::string& text) -> absl::StatusOr<std::string> {
    char* quoted = PQescapeLiteral(conn_, text.data(), text.size());
    if (quoted == nullptr) return absl::InternalError(PQerrorMessage(conn_));
    std::string out(quoted);
    PQfreemem(quoted);
    return out;
  };
  // The samples refused for lack of consent, to learn which an earlier send already stored.
  std::vector<std::string> refused_tenants;
  std::vector<std::string> refused_devices;
  std::vector<std::string> refused_seqs;
  std::vector<std::string> refused_times;
  for (WriteRequest* w : live) {
    for (const RefusedSample& r : w->refused) {
      refused_tenants.push_back(w->tenant_id);
      refused_devices.push_back(w->device_id);
      refused_seqs.push_back(absl::StrCat(r.seq));
      refused_times.push_back(
          absl::FormatTime("%Y-%m-%d %H:%M:%E6S+00", r.measured_at, absl::UTCTimeZone()));
    }
  }
  std::optional<sql::RefusedKeys> refused_keys;
  if (!refused_seqs.empty()) {
    refused_keys = sql::RefusedKeys{
        pg::TextArrayLiteral(refused_tenants), pg::TextArrayLiteral(refused_devices),
        pg::TextArrayLiteral(refused_seqs), pg::TextArrayLiteral(refused_times)};
  }
  absl::StatusOr<std::string> query = sql::WriteVitalsQuery(
      quote, pg::TextArrayLiteral(tenants), pg::TextArrayLiteral(devices),
      pg::TextArrayLiteral(max_seqs), refused_keys ? &*refused_keys : nullptr);
  if (!query.ok()) return fail(query.status());

  // First round trip: open the transaction, lock and read the devices' cursors, advance them to
  // what this transaction stores, start the COPY. Second: the rows. Third: the audit entries of
  // what was stored, and COMMIT. Any error ends a query string there, so nothing after it runs.
  if (PQsendQuery(conn_, query->c_str()) != 1) {
    return fail(absl::UnavailableError(absl::StrCat("database '", region_id_, "' unreachable: ",
                                                    PQerrorMessage(conn_))));
  }
  in_transaction = true;
  std::map<DeviceKey, int64_t> cursors;  // where each device stood before this transaction
  // Of the refused samples, in the order of refused_seqs, those already stored.
  std::vector<bool> refused_stored(refused_seqs.size(), false);
  std::vector<ExecStatusType> results = {PGRES_COMMAND_OK, PGRES_TUPLES_OK};
  if (refused_keys) results.push_back(PGRES_TUPLES_OK);
  results.push_back(PGRES_COPY_IN);
  for (size_t step = 0; step < results.size(); ++step) {
    PGresult* result = PQgetResult(conn_);
    if (PQresultStatus(result) != results[step]) {
      absl::Status status = ResultStatus(conn_, result);
      PQclear(result);
      return fail(status);
    }
    for (int i = 0; step == 1 && i < PQntuples(result); ++i) {
      cursors[{PQgetvalue(result, i, 0), PQgetvalue(result, i, 1)}] =
          std::stoll(PQgetvalue(result, i, 2));
    }
    for (int i = 0; step == 2 && refused_keys && i < PQntuples(result); ++i) {
      const size_t position = std::stoull(PQgetvalue(result, i, 0));
      if (position >= 1 && position <= refused_stored.size()) refused_stored[position - 1] = true;
    }
    PQclear(result);
  }
  const absl::Time locked = absl::Now();

  // What this transaction stores, when it has refused samples to compare with (one an earlier
  // batch of the same device stores in this very transaction is not found by the look-up).
  std::map<std::tuple<std::string, std::string, uint64_t>, absl::Time> stored_now;
  // Everything new goes in one binary COPY.
  std::string buffer("PGCOPY\n\377\r\n\0", 11);
  PutU32(buffer, 0);
  PutU32(buffer, 0);
  for (size_t i = 0; i < live.size(); ++i) {
    WriteRequest& w = *live[i];
    WriteOutcome& out = outcomes[i];
    int64_t& cursor = cursors[{w.tenant_id, w.device_id}];
    for (const VitalRow& v : w.rows) {
      if (static_cast<int64_t>(v.seq) <= cursor) {
        ++out.duplicates;
        continue;
      }
      cursor = static_cast<int64_t>(v.seq);
      ++out.stored;
      if (refused_keys) stored_now[{w.tenant_id, w.device_id, v.seq}] = v.measured_at;
      if (v.location) {
        ++out.locations_kept;
      } else if (v.location_dropped) {
        ++out.locations_dropped;
      }
      PutU16(buffer, 11);
      PutText(buffer, w.tenant_id);
      PutText(buffer, w.device_id);
      PutInt64(buffer, static_cast<int64_t>(v.seq));
      PutText(buffer, w.patient_id);
      PutText(buffer, v.loinc);
      PutDouble(buffer, v.value);
      PutText(buffer, v.ucum);
      PutInt64(buffer, absl::ToUnixMicros(v.measured_at) - kPgEpochMicros);
      if (v.location) {
        PutDouble(buffer, v.location->latitude);
        PutDouble(buffer, v.location->longitude);
        PutDouble(buffer, v.location->accuracy_m);
      } else {
        PutNull(buffer);
        PutNull(buffer);
        PutNull(buffer);
      }
    }
  }
  PutU16(buffer, 0xffff);
  const absl::Time encoded = absl::Now();
  if (PQputCopyData(conn_, buffer.data(), static_cast<int>(buffer.size())) != 1 ||
      PQputCopyEnd(conn_, nullptr) != 1) {
    return fail(absl::UnavailableError(absl::StrCat("COPY to ", region_id_, " failed: ",
                                                    PQerrorMessage(conn_))));
  }
  // The next result of the query string, which must be `want`.
  auto expect = [this](ExecStatusType want) {
    PGresult* result = PQgetResult(conn_);
    absl::Status status =
        PQresultStatus(result) == want ? absl::OkStatus() : ResultStatus(conn_, result);
    PQclear(result);
    return status;
  };
  if (absl::Status copied = expect(PGRES_COMMAND_OK); !copied.ok()) return fail(copied);
  while (PGresult* extra = PQgetResult(conn_)) PQclear(extra);
  const absl::Time copied = absl::Now();

  // One audit entry per batch that stores something: which device created which of the
  // patient's samples, under which consent (no values); and one per batch refused for lack of
  // consent.
  std::vector<audit::Entry> entries;
  size_t refused_position = 0;  // in refused_stored
  for (size_t i = 0; i < live.size(); ++i) {
    const WriteRequest& w = *live[i];
    auto add = [&]() -> audit::Entry& {
      audit::Entry& e = entries.emplace_back();
      if (w.source != nullptr) {
        e.actor = w.source->actor;
        e.origin = w.source->origin;
      }
      e.tenant = w.tenant_id;
      e.action = audit::Action::kCreate;
      e.object_type = "vitals";
      e.object_id = w.device_id;
      e.patient_id = w.patient_id;
      e.purpose = "REMOTE_MONITORING";
      e.request_id = absl::StrCat("batch:", w.batch_seq);
      return e;
    };
    if (outcomes[i].stored > 0) {
      audit::Entry& e = add();
      e.decision = audit::Decision::kPermit;
      // "CODE: detail", as every entry's reason, so that QueryAudit shows the code apart.
      e.reason = absl::StrCat("PERMITTED: stored=", outcomes[i].stored,
                              " duplicates=", outcomes[i].duplicates);
      // What became of the stored rows' locations, and under which GEOLOCATION decision.
      if (outcomes[i].locations_kept > 0) {
        absl::StrAppend(&e.reason, " locations=", outcomes[i].locations_kept, " ",
                        w.locations_kept_under);
      } else if (outcomes[i].locations_dropped > 0 && !w.locations_dropped_for.empty()) {
        absl::StrAppend(&e.reason, " locations_dropped=", outcomes[i].locations_dropped, " ",
                        w.locations_dropped_for);
      }
      e.consent_id = w.consent_id;
      e.consent_version = w.consent_version;
    }
    // The refusal counts the samples it refused now: not those an earlier send stored.
    uint32_t refused_now = 0;
    std::vector<absl::string_view> categories;
    for (const RefusedSample& r : w.refused) {
      const bool stored_before = refused_stored[refused_position++];
      const auto now_stored = stored_now.find({w.tenant_id, w.device_id, r.seq});
      if (stored_before || (now_stored != stored_now.end() &&
                            absl::ToUnixMicros(now_stored->second) ==
                                absl::ToUnixMicros(r.measured_at))) {
        outcomes[i].refused_already_stored.push_back(r.seq);
        continue;
      }
      ++refused_now;
      if (std::find(categories.begin(), categories.end(), r.category) == categories.end()) {
        categories.push_back(r.category);
      }
    }
    if (refused_now > 0) {
      audit::Entry& e = add();
      e.decision = audit::Decision::kDeny;
      e.reason = absl::StrCat(w.denial_code, ": refused=", refused_now,
                              " categories=", absl::StrJoin(categories, ","));
      e.consent_id = w.denial_consent_id;
      e.consent_version = w.denial_consent_version;
    }
  }
  absl::StatusOr<std::string> finish = sql::AuditAndCommitQuery(quote, entries);
  if (!finish.ok()) return fail(finish.status());
  commit_sent = true;
  if (PQsendQuery(conn_, finish->c_str()) != 1) {
    return fail(absl::UnavailableError(absl::StrCat("database '", region_id_, "' unreachable: ",
                                                    PQerrorMessage(conn_))));
  }
  if (!entries.empty()) {
    if (absl::Status audited = expect(PGRES_TUPLES_OK); !audited.ok()) return fail(audited);
  }
  PGresult* commit = PQgetResult(conn_);
  const bool committed_ok = PQresultStatus(commit) == PGRES_COMMAND_OK &&
                            std::strcmp(PQcmdStatus(commit), "COMMIT") == 0;
  absl::Status commit_status = committed_ok ? absl::OkStatus() : ResultStatus(conn_, commit);
  if (committed_ok || PQresultStatus(commit) == PGRES_COMMAND_OK) in_transaction = false;
  PQclear(commit);
  if (!committed_ok) {
    // If the connection broke during COMMIT the outcome is unknown: the batches are not acked,
    // and the device's resend is deduplicated by the cursor if the commit did happen.
    if (commit_status.ok()) commit_status = absl::AbortedError("the transaction was rolled back");
    in_transaction = false;
    return fail(commit_status);
  }
  while (PGresult* extra = PQgetResult(conn_)) PQclear(extra);
  if (watch.fired()) {
    // Committed, then given up on just after: the connection goes, the outcome stands.
    PQfinish(conn_);
    conn_ = nullptr;
  }
  const absl::Time committed = absl::Now();
  stats_.transactions += 1;
  stats_.batches += live.size();
  for (const WriteOutcome& o : outcomes) stats_.rows += o.stored;
  stats_.open += locked - began;
  stats_.encode += encoded - locked;
  stats_.copy += copied - encoded;
  stats_.commit += committed - copied;
  stats_.longest = std::max(stats_.longest, committed - began);
  for (const WriteRequest* r : live) {
    stats_.longest_wait = std::max(stats_.longest_wait, began - r->read_at);
  }
  if (committed - stats_.since >= options_.stats_interval) {
    const double n = static_cast<double>(stats_.transactions);
    log::Info("vitals_writer_stats",
              {{"region", region_id_},
               {"transactions", stats_.transactions},
               {"rows_per_transaction", static_cast<double>(stats_.rows) / n},
               {"batches_per_transaction", static_cast<double>(stats_.batches) / n},
               {"open_ms", absl::ToDoubleMilliseconds(stats_.open) / n},
               {"encode_ms", absl::ToDoubleMilliseconds(stats_.encode) / n},
               {"copy_ms", absl::ToDoubleMilliseconds(stats_.copy) / n},
               {"commit_ms", absl::ToDoubleMilliseconds(stats_.commit) / n},
               {"longest_transaction_ms", absl::ToDoubleMilliseconds(stats_.longest)},
               {"longest_wait_ms", absl::ToDoubleMilliseconds(stats_.longest_wait)}});
    stats_ = WriterStats{};
    stats_.since = committed;
  }
  for (size_t i = 0; i < live.size(); ++i) {
    outcomes[i].highest_committed_seq =
        static_cast<uint64_t>(cursors[{live[i]->tenant_id, live[i]->device_id}]);
  }
  return absl::OkStatus();
}

}  // namespace medgate::ingest
