// The ingest logic for one batch.
#include "services/ingest/ingest_core.h"

#include <algorithm>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "libs/common/status_macros.h"

namespace medgate::ingest {

IngestCore::IngestCore(RoutingClient& routing, consent::ConsentCache& consent,
                       std::map<std::string, std::vector<VitalsWriter*>> writers,
                       IngestOptions options)
    : routing_(routing),
      consent_(consent),
      writers_(std::move(writers)),
      options_(options),
      quota_(options.tenant_samples_per_second, options.tenant_burst) {}

absl::Status IngestCore::CheckBatch(uint64_t batch_seq, size_t samples) {
  if (batch_seq == 0) {
    return absl::InvalidArgumentError(
        "batch_seq must be at least 1 (it identifies the batch in its ack and in the audit log)");
  }
  if (samples == 0 || samples > kMaxSamplesPerBatch) {
    return absl::InvalidArgumentError(absl::StrCat("batch ", batch_seq, " has ", samples,
                                                   " samples; a batch has 1 to ",
                                                   kMaxSamplesPerBatch));
  }
  return absl::OkStatus();
}

absl::Status IngestCore::Process(const Principal& device,
                                 std::shared_ptr<const BatchSource> source,
                                 uint64_t batch_seq,
                                 std::vector<Sample>& samples,
                                 std::shared_ptr<std::atomic<bool>> poisoned, absl::Time read_at,
                                 std::function<void(BatchResult)> done, Later* later) {
  const bool may_block = later == nullptr;
  // A stream's batch comes here first with `later` (and again without it when it had to wait).
  if (!may_block) batches_.fetch_add(1, std::memory_order_relaxed);
  RETURN_IF_ERROR(CheckBatch(batch_seq, samples.size()));
  BatchResult result;
  result.batch_seq = batch_seq;
  auto retry = [&](absl::Status status, absl::Duration after) {
    result.retryable = std::move(status);
    result.retry_after = after;
    done(std::move(result));
    return absl::OkStatus();
  };

  // Where the device's patient lives (cached, batched lookups in the routing client).
  const DeviceRef ref{device.tenant, device.name};
  absl::StatusOr<std::vector<DeviceLocation>> located;
  if (may_block) {
    located = routing_.ResolveDevices({ref});
  } else if (std::optional<std::vector<DeviceLocation>> cached = routing_.CachedDevices({ref})) {
    located = *std::move(cached);
  } else {
    later->again = true;
    return absl::OkStatus();
  }
  if (!located.ok()) return retry(absl::UnavailableError("routing unavailable; resend"), absl::Seconds(1));
  const DeviceLocation& where = (*located)[0];
  if (!where.tenant_active) {
    return absl::PermissionDeniedError(absl::StrCat(
        "tenant '", device.tenant, "' is suspended or not registered: its devices may not "
        "stream until ops activate it"));
  }
  if (!where.found) {
    return absl::FailedPreconditionError(
        "this device is not assigned to a patient; its tenant must assign it first");
  }
  auto lanes = writers_.find(where.region_id);
  if (lanes == writers_.end() || lanes->second.empty()) {
    return retry(absl::UnavailableError(absl::StrCat("region ", where.region_id,
                                                     " is not served by this ingest instance")),
                 absl::Seconds(5));
  }

  const absl::Time now = read_at;
  // The decision, from memory only unless `may_block`; nullopt: it would have to wait.
  auto check = [&](consent::Purpose purpose, absl::string_view category)
      -> std::optional<absl::StatusOr<consent::AccessDecision>> {
    if (may_block) {
      return consent_.Check(where.region_id, where.patient_id, purpose, device.spiffe_id,
                            category, now);
    }
    return consent_.CheckCached(where.region_id, where.patient_id, purpose, device.spiffe_id,
                                category, now);
  };
  // REMOTE_MONITORING decided for each data category the batch's samples are of (a consent may
  // be narrowed to some measures), at most one decision a category. Samples of codes outside the
  // catalogue are rejected by validation and need none.
  std::vector<std::pair<absl::string_view, consent::AccessDecision>> monitoring;
  auto monitoring_of = [&](absl::string_view category) -> const consent::AccessDecision* {
    for (const auto& [c, decision] : monitoring) {
      if (c == category) return &decision;
    }
    return nullptr;
  };
  bool any_permit = false;
  absl::string_view last_code;  // a batch's samples are mostly of one code: looked up once
  for (const Sample& s : samples) {
    if (s.loinc == last_code) continue;
    last_code = s.loinc;
    const VitalKind* kind = FindVital(s.loinc);
    if (kind == nullptr || monitoring_of(kind->category) != nullptr) continue;
    std::optional<absl::StatusOr<consent::AccessDecision>> checked =
        check(consent::Purpose::kRemoteMonitoring, kind->category);
    if (!checked) {
      later->again = true;
      return absl::OkStatus();
    }
    if (!checked->ok()) {
      return retry(absl::UnavailableError("consent unavailable; resend"), absl::Seconds(1));
    }
    any_permit = any_permit || (*checked)->permit;
    monitoring.emplace_back(kind->category, **checked);
  }
  bool has_location = std::any_of(samples.begin(), samples.end(),
                                  [](const Sample& s) { return s.location.has_value(); });
  std::optional<consent::AccessDecision> geolocation;  // asked only when the batch has locations
  if (any_permit && has_location) {
    // Locations are a category of their own: GEOLOCATION consents are not narrowed.
    std::optional<absl::StatusOr<consent::AccessDecision>> geo =
        check(consent::Purpose::kGeolocation, "");
    if (!geo) {
      later->again = true;
      return absl::OkStatus();
    }
    if (!geo->ok()) return retry(absl::UnavailableError("consent unavailable; resend"), absl::Seconds(1));
    geolocation = **geo;
  }
  const bool keep_locations = geolocation && geolocation->permit;

  // Every sample received is charged, stored or not: validating, refusing and auditing cost the
  // service too, so a stream of invalid or unconsented samples meets the quota like any other.
  // Charged before validation, so a refused batch costs no validation either.
  const double charged = static_cast<double>(samples.size());
  absl::Duration wait = quota_.TryTake(device.tenant, charged, now);
  if (wait > absl::ZeroDuration()) {
    quota_refused_.fetch_add(1, std::memory_order_relaxed);
    return retry(absl::ResourceExhaustedError("tenant sample quota exceeded; resend later"), wait);
  }

  std::vector<VitalRow> rows;
  rows.reserve(samples.size());
  uint64_t previous_seq = 0;
  std::vector<RefusedSample> refused;
  // The decision the stored samples rest on, and the first refusal with the categories refused,
  // for the batch's audit entries. A device is covered by its tenant's tenant-wide consent only
  // (consents are narrowed to practitioners and apps, never devices), so every category's
  // decision rests on that one consent.
  const consent::AccessDecision* stored_under = nullptr;
  const consent::AccessDecision* refused_under = nullptr;
  for (uint32_t i = 0; i < samples.size(); ++i) {
    Sample& s = samples[i];
    Verdict verdict = ValidateSample(s, previous_seq, now, options_.validation);
    // A sample belongs to the patient the device fed when it was measured: one from before the
    // current assignment (a former patient's, buffered on the device, or from while it fed
    // nobody) is not this patient's, whoever it was.
    if (verdict.reject == Reject::kNone && *s.measured_at < where.assigned_at) {
      verdict = {Reject::kBeforeAssignment,
                 absl::StrCat("measured at ", absl::FormatTime(absl::RFC3339_full, *s.measured_at,
                                                               absl::UTCTimeZone()),
                              ", before this device's assignment to its patient began at ",
                              absl::FormatTime(absl::RFC3339_full, where.assigned_at,
                                               absl::UTCTimeZone()),
                              ": not this patient's sample")};
    }
    if (verdict.reject == Reject::kNone) {
      const absl::string_view category = verdict.kind->category;
      const consent::AccessDecision& decision = *monitoring_of(category);
      if (!decision.permit) {
        verdict = {Reject::kNoConsent,
                   absl::StrCat("no REMOTE_MONITORING consent for this patient's ", category,
                                " samples (", consent::AccessReasonName(decision.reason), ")")};
        if (refused.empty()) refused_under = &decision;
        refused.push_back({s.seq, *s.measured_at, category});
      } else if (stored_under == nullptr) {
        stored_under = &decision;
      }
    }
    if (s.seq > previous_seq) previous_seq = s.seq;
    if (verdict.reject != Reject::kNone) {
      result.rejections.push_back({i, s.seq, verdict.reject, std::move(verdict.detail)});
      continue;
    }
    VitalRow row;
    row.seq = s.seq;
    row.loinc = std::move(s.loinc);
    row.value = s.value;
    row.ucum = std::move(s.ucum);
    row.measured_at = *s.measured_at;
    if (s.location && keep_locations) {
      row.location = s.location;
    } else if (s.location) {
      row.location_dropped = true;  // dropped before storage: no GEOLOCATION consent
    }
    rows.push_back(std::move(row));
  }
  // A batch refused for lack of consent is audited as a denial, through the writer like a stored
  // one (answered once its entry is committed); one with nothing else to store is answered now.
  if (rows.empty() && refused.empty()) {
    done(std::move(result));
    return absl::OkStatus();
  }

  WriteRequest request;
  request.tenant_id = device.tenant;
  request.device_id = device.name;
  request.patient_id = where.patient_id;
  request.rows = std::move(rows);
  request.poisoned = std::move(poisoned);
  request.read_at = read_at;
  request.source = std::move(source);
  request.batch_seq = batch_seq;
  if (stored_under != nullptr) {
    request.consent_id = stored_under->consent_id;
    request.consent_version = stored_under->consent_version;
  }
  if (!refused.empty()) {
    request.refused = std::move(refused);
    request.denial_code = std::string(consent::AccessReasonName(refused_under->reason));
    request.denial_consent_id = refused_under->consent_id;
    request.denial_consent_version = refused_under->consent_version;
  }
  // The entry cites REMOTE_MONITORING; where the rows it stores had locations, it says what
  // became of them and under which GEOLOCATION decision, so the chain answers under which consent
  // a location was kept or why it was not (the writer counts them: duplicates store nothing).
  if (geolocation) {
    if (keep_locations) {
      request.locations_kept_under = absl::StrCat("GEOLOCATION=", geolocation->consent_id, "/v",
                                                  geolocation->consent_version);
    } else {
      request.locations_dropped_for =
          absl::StrCat("GEOLOCATION=", consent::AccessReasonName(geolocation->reason));
    }
  }
  auto shared = std::make_shared<BatchResult>(std::move(result));
  auto finish = std::make_shared<std::function<void(BatchResult)>>(std::move(done));
  // A batch not stored is given back to the quota, so the device's resend is not refused for it;
  // duplicates stay charged (accepted work).
  request.done = [this, tenant = device.tenant, charged, shared, finish](const WriteOutcome& outcome) {
    BatchResult r = std::move(*shared);
    if (!outcome.status.ok()) {
      quota_.Refund(tenant, charged);
      r.retryable = outcome.status;
      r.retry_after = absl::Seconds(1);
    } else {
      r.stored = outcome.stored;
      r.duplicates = outcome.duplicates;
      // Refused samples an earlier send already stored are answered as the duplicates they are.
      if (!outcome.refused_already_stored.empty()) {
        std::erase_if(r.rejections, [&](const Rejection& x) {
          return x.reason == Reject::kNoConsent &&
                 std::binary_search(outcome.refused_already_stored.begin(),
                                    outcome.refused_already_stored.end(), x.seq);
        });
        r.duplicates += static_cast<uint32_t>(outcome.refused_already_stored.size());
      }
      r.locations_dropped = outcome.locations_dropped;
      r.highest_committed_seq = outcome.highest_committed_seq;
    }
    (*finish)(std::move(r));
  };
  VitalsWriter* writer =
      lanes->second[absl::HashOf(device.tenant, device.name) % lanes->second.size()];
  if (!may_block && writer->TryEnqueue(request)) return absl::OkStatus();
  // Waits for room (or not), then queues the request or answers that the queue is full.
  auto enqueue = [this, writer, tenant = device.tenant, region = where.region_id, charged, shared,
                  finish, held = std::make_shared<WriteRequest>(std::move(request))](bool wait) {
    std::unique_ptr<BoundedCounts<int>::Slot> waiting_any;
    std::unique_ptr<BoundedCounts<std::string>::Slot> waiting;
    if (wait) waiting_any = waiting_all_.TryTake(0, options_.max_waiting);
    if (waiting_any) waiting = waiting_by_region_.TryTake(region, options_.max_waiting_per_region);
    const absl::Duration patience = waiting ? options_.enqueue_wait : absl::ZeroDuration();
    if (writer->Enqueue(std::move(*held), patience)) return;
    queue_full_.fetch_add(1, std::memory_order_relaxed);
    quota_.Refund(tenant, charged);
    BatchResult busy = std::move(*shared);
    busy.retryable = absl::ResourceExhaustedError(
        absl::StrCat("region ", region, " write queue is full; resend later"));
    busy.retry_after = absl::Seconds(1);
    (*finish)(std::move(busy));
  };
  if (may_block) {
    enqueue(/*wait=*/true);
  } else {
    later->enqueue = std::move(enqueue);
  }
  return absl::OkStatus();
}

}  // namespace medgate::ingest
