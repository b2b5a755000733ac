// Unit tests of stored vital samples as FHIR R4 Observations.
#include "services/ingest/fhir_observation.h"

#include <cmath>
#include <limits>
#include <random>
#include <regex>
#include <string>

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "libs/common/fhir_json.h"

namespace medgate::ingest {
namespace {

using google::protobuf::Struct;
using google::protobuf::Value;

constexpr char kDevice[] = "spiffe://medgate.test/tenant/acme/device/dev-1";

StoredSample HeartRate() {
  StoredSample s;
  s.device_spiffe_id = kDevice;
  s.sample.seq = 42;
  s.sample.loinc = "8867-4";
  s.sample.value = 72;
  s.sample.ucum = "/min";
  s.sample.measured_at = absl::FromUnixMicros(1'800'000'000'123'456);
  s.received_at = absl::FromUnixMicros(1'800'000'001'500'000);
  return s;
}

// The JSON parsed as a generic object: it fails the test if it is not one JSON object.
Struct Parse(const std::string& json) {
  Struct parsed;
  const auto status = google::protobuf::util::JsonStringToMessage(json, &parsed);
  EXPECT_TRUE(status.ok()) << status.ToString() << "\n" << json;
  return parsed;
}

const Value& Field(const Struct& object, const std::string& name) {
  static const Value kMissing;
  auto it = object.fields().find(name);
  EXPECT_NE(it, object.fields().end()) << "no field " << name;
  return it == object.fields().end() ? kMissing : it->second;
}

const Struct& Object(const Struct& object, const std::string& name) {
  return Field(object, name).struct_value();
}

const Struct& First(const Struct& object, const std::string& name) {
  static const Struct kEmpty;
  const Value& list = Field(object, name);
  EXPECT_GE(list.list_value().values_size(), 1) << name;
  return list.list_value().values_size() == 0 ? kEmpty : list.list_value().values(0).struct_value();
}

std::string Text(const Struct& object, const std::string& name) {
  return Field(object, name).string_value();
}

TEST(FhirObservationTest, AHeartRateIsAFinalVitalSignsObservationOfItsPatientAndDevice) {
  const std::string json = FhirObservationJson(HeartRate(), "pt_3b0c");
  EXPECT_EQ(json.find('\n'), std::string::npos) << "one NDJSON line";
  EXPECT_THAT(json, ::testing::StartsWith("{\"resourceType\":\"Observation\","));
  const Struct o = Parse(json);
  EXPECT_EQ(Text(o, "resourceType"), "Observation");
  EXPECT_EQ(Text(o, "status"), "final");
  const Struct& identifier = First(o, "identifier");
  EXPECT_EQ(Text(identifier, "system"), kFhirSampleSystem);
  EXPECT_EQ(Text(identifier, "value"), std::string(kDevice) + "#42");
  const Struct& category = First(First(o, "category"), "coding");
  EXPECT_EQ(Text(category, "system"), "http://terminology.hl7.org/CodeSystem/observation-category");
  EXPECT_EQ(Text(category, "code"), "vital-signs");
  const Struct& code = Object(o, "code");
  EXPECT_EQ(Text(First(code, "coding"), "system"), "http://loinc.org");
  EXPECT_EQ(Text(First(code, "coding"), "code"), "8867-4");
  EXPECT_EQ(Text(code, "text"), "heart rate");
  EXPECT_EQ(Text(Object(o, "subject"), "type"), "Patient");
  EXPECT_EQ(Text(Object(o, "device"), "type"), "Device");
  const Struct& subject = Object(Object(o, "subject"), "identifier");
  EXPECT_EQ(Text(subject, "system"), fhir::kPatientSystem);
  EXPECT_EQ(Text(subject, "value"), "pt_3b0c");
  EXPECT_EQ(Text(o, "effectiveDateTime"), "2027-01-15T08:00:00.123456Z");
  EXPECT_EQ(Text(o, "issued"), "2027-01-15T08:00:01.5Z");
  const Struct& quantity = Object(o, "valueQuantity");
  EXPECT_EQ(Field(quantity, "value").number_value(), 72);
  EXPECT_EQ(Text(quantity, "unit"), "/min");
  EXPECT_EQ(Text(quantity, "code"), "/min");
  EXPECT_EQ(Text(quantity, "system"), "http://unitsofmeasure.org");
  const Struct& device = Object(Object(o, "device"), "identifier");
  EXPECT_EQ(Text(device, "system"), "urn:ietf:rfc:3986");
  EXPECT_EQ(Text(device, "value"), kDevice);
  EXPECT_EQ(o.fields().count("extension"), 0u) << "no location, no extension";
  EXPECT_EQ(Field(code, "coding").list_value().values_size(), 1);
}

TEST(FhirObservationTest, PulseOximetryAlsoCarriesTheOxygenSaturationCode) {
  StoredSample s = HeartRate();
  s.sample.loinc = "59408-5";
  s.sample.ucum = "%";
  s.sample.value = 97;
  const Struct o = Parse(FhirObservationJson(s, "p"));
  const Value& codings = Field(Object(o, "code"), "coding");
  ASSERT_EQ(codings.list_value().values_size(), 2);
  EXPECT_EQ(Text(codings.list_value().values(0).struct_value(), "code"), "59408-5");
  EXPECT_EQ(Text(codings.list_value().values(1).struct_value(), "code"), "2708-6");
  EXPECT_EQ(Text(codings.list_value().values(1).struct_value(), "system"), "http://loinc.org");
}

TEST(FhirObservationTest, BloodGlucoseIsALaboratoryObservation) {
  StoredSample s = HeartRate();
  s.sample.loinc = "15074-8";
  s.sample.ucum = "mmol/L";
  s.sample.value = 5.4;
  const Struct o = Parse(FhirObservationJson(s, "p"));
  EXPECT_EQ(Text(First(First(o, "category"), "coding"), "code"), "laboratory");
  EXPECT_EQ(Text(Object(o, "code"), "text"), "blood glucose (moles)");
  EXPECT_EQ(Text(Object(o, "valueQuantity"), "unit"), "mmol/L");
  EXPECT_EQ(Field(Object(o, "valueQuantity"), "value").number_value(), 5.4);
}

TEST(FhirObservationTest, ALocationIsTheMeasuredAtLocationExtension) {
  StoredSample s = HeartRate();
  s.sample.location = Location{48.8566, 2.3522, 12.5};
  Struct o = Parse(FhirObservationJson(s, "p"));
  const Struct& extension = First(o, "extension");
  EXPECT_EQ(Text(extension, "url"), kFhirLocationUrl);
  const Value& parts = Field(extension, "extension");
  ASSERT_EQ(parts.list_value().values_size(), 3);
  const Struct& latitude = parts.list_value().values(0).struct_value();
  const Struct& longitude = parts.list_value().values(1).struct_value();
  const Struct& accuracy = parts.list_value().values(2).struct_value();
  EXPECT_EQ(Text(latitude, "url"), "latitude");
  EXPECT_EQ(Field(latitude, "valueDecimal").number_value(), 48.8566);
  EXPECT_EQ(Text(longitude, "url"), "longitude");
  EXPECT_EQ(Field(longitude, "valueDecimal").number_value(), 2.3522);
  EXPECT_EQ(Text(accuracy, "url"), "accuracy");
  EXPECT_EQ(Field(Object(accuracy, "valueQuantity"), "value").number_value(), 12.5);
  EXPECT_EQ(Text(Object(accuracy, "valueQuantity"), "code"), "m");

  // An unknown accuracy (0) is left out.
  s.sample.location = Location{-33.9, 151.2, 0};
  o = Parse(FhirObservationJson(s, "p"));
  EXPECT_EQ(Field(First(o, "extension"), "extension").list_value().values_size(), 2);
}

// Every value reads back as the double that was stored, whatever its digits.
TEST(FhirObservationTest, RandomValuesReadBackExactly) {
  std::mt19937_64 random(20261205);
  for (int i = 0; i < 2000; ++i) {
    StoredSample s = HeartRate();
    const VitalKind& kind = VitalCatalogue()[random() % VitalCatalogue().size()];
    s.sample.loinc = std::string(kind.loinc);
    s.sample.ucum = std::string(kind.ucum);
    s.sample.value = std::uniform_real_distribution<double>(kind.min, kind.max)(random);
    if (i % 3 == 0) s.sample.value = std::round(s.sample.value * 10) / 10;
    s.sample.location = Location{std::uniform_real_distribution<double>(-90, 90)(random),
                                 std::uniform_real_distribution<double>(-180, 180)(random), 0};
    const std::string json = FhirObservationJson(s, "p");
    const Struct o = Parse(json);
    ASSERT_EQ(Field(Object(o, "valueQuantity"), "value").number_value(), s.sample.value) << json;
    ASSERT_EQ(Text(Object(o, "valueQuantity"), "code"), kind.ucum);
    const Value& parts = Field(First(o, "extension"), "extension");
    ASSERT_EQ(parts.list_value().values_size(), 2) << json;
    ASSERT_EQ(Field(parts.list_value().values(0).struct_value(), "valueDecimal").number_value(),
              s.sample.location->latitude);
    ASSERT_EQ(Field(parts.list_value().values(1).struct_value(), "valueDecimal").number_value(),
              s.sample.location->longitude);
  }
}

// The JSON numbers of `json`: the values of members that start as a number does.
std::vector<std::string> Numbers(const std::string& json) {
  static const std::regex kNumber("\":(-?[0-9][0-9.eE+-]*)");
  std::vector<std::string> numbers;
  for (auto it = std::sregex_iterator(json.begin(), json.end(), kNumber);
       it != std::sregex_iterator(); ++it) {
    numbers.push_back((*it)[1].str());
  }
  return numbers;
}

// Tiny and huge values too (none is stored, the catalogue's ranges are narrower): plain decimals,
// no exponent, each reading back exactly.
TEST(FhirObservationTest, NumbersAreDecimalsWithoutAnExponentWhateverTheirSize) {
  const double values[] = {std::numeric_limits<double>::denorm_min(),
                           std::numeric_limits<double>::min(),
                           1e-7,
                           0.0001,
                           -0.0001,
                           123456789.125,
                           1e21,
                           std::numeric_limits<double>::max(),
                           -std::numeric_limits<double>::max()};
  for (double value : values) {
    StoredSample s = HeartRate();
    s.sample.value = value;
    s.sample.location = Location{value, -value, std::fabs(value)};
    const std::string json = FhirObservationJson(s, "p");
    const Struct o = Parse(json);
    EXPECT_EQ(Field(Object(o, "valueQuantity"), "value").number_value(), value) << json;
    const Value& parts = Field(First(o, "extension"), "extension");
    ASSERT_EQ(parts.list_value().values_size(), 3) << json;
    EXPECT_EQ(Field(parts.list_value().values(0).struct_value(), "valueDecimal").number_value(),
              value);
    EXPECT_EQ(Field(parts.list_value().values(1).struct_value(), "valueDecimal").number_value(),
              -value);
    const std::vector<std::string> numbers = Numbers(json);
    EXPECT_EQ(numbers.size(), 4u) << json;  // value, latitude, longitude, accuracy
    for (const std::string& number : numbers) {
      EXPECT_EQ(number.find_first_of("eE"), std::string::npos) << number;
    }
  }
}

TEST(FhirObservationTest, StringsAreEscaped) {
  StoredSample s = HeartRate();
  s.device_spiffe_id = "spiffe://medgate.test/tenant/acme/device/a\"b\\c\n\t\x01/é";
  const std::string json = FhirObservationJson(s, "pt\"1");
  EXPECT_EQ(json.find('\n'), std::string::npos) << "one NDJSON line";
  const Struct o = Parse(json);
  EXPECT_EQ(Text(Object(Object(o, "device"), "identifier"), "value"), s.device_spiffe_id);
  EXPECT_EQ(Text(Object(Object(o, "subject"), "identifier"), "value"), "pt\"1");
}

}  // namespace
}  // namespace medgate::ingest
