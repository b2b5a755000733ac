// The Helm chart (helm/medgate), rendered by helm/render (Helm's template engine and functions),
// checked against what the services themselves accept: the configuration it writes goes through
// the services' own parsers, and every path, port and identity that configuration names is
// checked against what the pods mount, expose and are issued.
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include "absl/algorithm/container.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "libs/common/config.h"
#include "libs/residency/placement.h"
#include "libs/server/probe.h"
#include "services/consent/consent_server.h"
#include "services/ingest/ingest_server.h"
#include "services/routing/routing_server.h"
#include "services/sharing/sharing_server.h"
#include "tests/support/shell.h"

namespace medgate {
namespace {

using ::testing::HasSubstr;
using test_support::ReadFile;
using ::testing::IsEmpty;
using ::testing::UnorderedElementsAre;

const std::string kChart = std::string(MEDGATE_SOURCE_DIR) + "/helm/medgate";
const std::string kFrance = kChart + "/examples/values-fr.yaml";
const std::vector<std::string> kServices = {"routing", "consent", "ingest", "sharing", "audit"};
const std::vector<std::string> kDeployments = {"routing", "consent", "ingest", "sharing"};

struct Render {
  int exit_code = -1;
  std::string manifests;  // stdout
  std::string error;      // stderr
  std::vector<YAML::Node> documents;
};

// Renders the chart with the example values of France, then `overrides` (YAML) on top.
Render RenderChart(const std::string& overrides = "", const std::string& release = "medgate") {
  static int counter = 0;
  // A directory of this process's own: names in the shared temporary directory could be another
  // run's (or user's) files.
  static const struct PrivateDir {
    PrivateDir() : path(testing::TempDir() + "/helm-chart-test-XXXXXX") {
      const char* made = mkdtemp(path.data());
      EXPECT_NE(made, nullptr) << "mkdtemp: " << std::strerror(errno);
    }
    ~PrivateDir() { std::filesystem::remove_all(path); }
    std::string path;
  } dir;
  const std::string values = absl::StrCat(dir.path, "/values-", ++counter, ".yaml");
  const std::string err = absl::StrCat(dir.path, "/err-", counter, ".txt");
  {
    std::ofstream out(values);
    out << overrides;
    EXPECT_TRUE(out.good()) << "cannot write " << values;
  }
  const std::string command =
      absl::StrCat(MEDGATE_HELM_RENDER, " ", kChart, " --release ", release,
                   " --namespace health -f ", kFrance, " -f ", values, " 2>", err);
  const test_support::ShellRun run = test_support::RunShell(command);
  Render render;
  render.exit_code = run.exit_code;
  render.manifests = run.output;
  render.error = ReadFile(err);
  std::filesystem::remove(values);
  std::filesystem::remove(err);
  if (render.exit_code == 0) {
    for (const YAML::Node& doc : YAML::LoadAll(render.manifests)) {
      if (doc.IsMap()) render.documents.push_back(doc);
    }
  }
  return render;
}

std::vector<YAML::Node> OfKind(const Render& render, const std::string& kind) {
  std::vector<YAML::Node> found;
  for (const YAML::Node& doc : render.documents) {
    if (doc["kind"].as<std::string>() == kind) found.push_back(doc);
  }
  return found;
}

YAML::Node Named(const Render& render, const std::string& kind, const std::string& name) {
  for (const YAML::Node& doc : OfKind(render, kind)) {
    if (doc["metadata"]["name"].as<std::string>() == name) return doc;
  }
  ADD_FAILURE() << "no " << kind << " named " << name;
  return YAML::Node();
}

std::string ConfigText(const Render& render, const std::string& config_map = "medgate-config") {
  return Named(render, "ConfigMap", config_map)["data"]["medgate.yaml"].as<std::string>();
}

MedgateConfig ParseConfig(const std::string& text) {
  absl::StatusOr<ConfigNode> root = ConfigNode::Parse(text);
  EXPECT_TRUE(root.ok()) << root.status();
  if (!root.ok()) return MedgateConfig();
  absl::StatusOr<MedgateConfig> config = ParseMedgateConfig(*root);
  EXPECT_TRUE(config.ok()) << config.status();
  return config.ok() ? *std::move(config) : MedgateConfig();
}

// The directory a path is in.
std::string Dir(const std::string& path) { return std::filesystem::path(path).parent_path(); }

// mountPath -> volume name, for one container.
std::map<std::string, std::string> Mounts(const YAML::Node& container) {
  std::map<std::string, std::string> mounts;
  for (const YAML::Node& m : container["volumeMounts"]) {
    mounts[m["mountPath"].as<std::string>()] = m["name"].as<std::string>();
  }
  return mounts;
}

YAML::Node Volume(const YAML::Node& pod, const std::string& name) {
  for (const YAML::Node& v : pod["volumes"]) {
    if (v["name"].as<std::string>() == name) return v;
  }
  ADD_FAILURE() << "no volume " << name;
  return YAML::Node();
}

int PortOf(const std::string& listen) {
  return std::stoi(listen.substr(listen.rfind(':') + 1));
}

class HelmChartTest : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    france_ = new Render(RenderChart());
    ASSERT_EQ(france_->exit_code, 0) << france_->error;
  }
  static void TearDownTestSuite() { delete france_; }
  static Render* france_;
};
Render* HelmChartTest::france_ = nullptr;

TEST_F(HelmChartTest, RendersEveryPartOfACountrysCluster) {
  std::map<std::string, int> kinds;
  for (const YAML::Node& doc : france_->documents) {
    ASSERT_TRUE(doc["apiVersion"].IsScalar()) << YAML::Dump(doc);
    ASSERT_TRUE(doc["metadata"]["name"].IsScalar()) << YAML::Dump(doc);
    ++kinds[doc["kind"].as<std::string>()];
  }
  EXPECT_EQ(kinds["Deployment"], 4);
  EXPECT_EQ(kinds["Service"], 5);
  EXPECT_EQ(kinds["Certificate"], 5);
  EXPECT_EQ(kinds["ConfigMap"], 2);  // the release's and the migrations' own
  EXPECT_EQ(kinds["Job"], 1);
  EXPECT_EQ(kinds["PodDisruptionBudget"], 4);
  EXPECT_EQ(kinds["ServiceAccount"], 1);
  // Default deny; one in and one out per service's pods; DNS for every pod; the migrations' own.
  EXPECT_EQ(kinds["NetworkPolicy"], 11);
  // Names are unique within a kind.
  std::set<std::string> names;
  for (const YAML::Node& doc : france_->documents) {
    EXPECT_TRUE(names.insert(doc["kind"].as<std::string>() + "/" +
                             doc["metadata"]["name"].as<std::string>())
                    .second);
  }
}

TEST_F(HelmChartTest, TheConfigurationIsOneEveryServiceAccepts) {
  const MedgateConfig config = ParseConfig(ConfigText(*france_));
  EXPECT_EQ(config.trust_domain, "fr.medgate.example");
  ASSERT_EQ(config.regions.size(), 2u);
  EXPECT_EQ(config.regions[0].id, "fr-1");
  EXPECT_THAT(config.regions[0].territories, UnorderedElementsAre("FR"));
  EXPECT_EQ(config.regions[1].id, "eu-1");
  EXPECT_THAT(config.regions[1].territories, UnorderedElementsAre("BE", "NL", "LU"));
  for (const RegionConfig& region : config.regions) {
    ASSERT_TRUE(region.keys_db.has_value()) << region.id;
  }
  ASSERT_TRUE(config.control_db.has_value());
  for (const std::string& name : kServices) {
    ASSERT_TRUE(config.Service(name).ok()) << name;
  }
  // Each service's own settings, through its own parser.
  absl::StatusOr<routing::RoutingSettings> routing = routing::ParseRoutingSettings(config);
  ASSERT_TRUE(routing.ok()) << routing.status();
  ASSERT_EQ(routing->seed_rules.size(), 4u);
  EXPECT_EQ(routing->seed_rules[0].territory, "FR");
  EXPECT_THAT(routing->seed_rules[0].region_ids, UnorderedElementsAre("fr-1"));
  EXPECT_THAT(routing->seed_rules[1].readable_from, UnorderedElementsAre("BE", "FR"));
  EXPECT_TRUE(consent::ParseConsentSettings(config).ok());
  absl::StatusOr<ingest::IngestSettings> ingest = ingest::ParseIngestSettings(config);
  ASSERT_TRUE(ingest.ok()) << ingest.status();
  EXPECT_EQ(ingest->max_streams_per_device, 2);
  // The tenant quota is the deployment's, shared by France's 3 ingest replicas.
  EXPECT_EQ(ingest->instances, 3);
  EXPECT_DOUBLE_EQ(ingest->core.tenant_samples_per_second, 50000.0 / 3);
  absl::StatusOr<sharing::SharingSettings> sharing = sharing::ParseSharingSettings(config);
  ASSERT_TRUE(sharing.ok()) << sharing.status();
  EXPECT_EQ(sharing->tenant_quota_bytes, int64_t{1} << 40);
  EXPECT_EQ(sharing->kek_file, "/run/medgate/secrets/keks/kek.hex");
  // Numbers as the values give them (Helm reads them as floats: 4194304 must not become
  // 4.194304e+06).
  EXPECT_EQ(config.limits.max_message_bytes, 4194304);
  EXPECT_EQ(config.limits.drain_seconds, 20);
  EXPECT_EQ(config.limits.tenant_calls_per_second, 1000);
  EXPECT_EQ(config.limits.tenant_call_burst, 2000);
  EXPECT_EQ(config.limits.max_health_watches_per_caller, 8);
  EXPECT_EQ(config.limits.max_health_watches, 1024);
  // The regions and seed rules pass routing's own residency checks.
  std::vector<residency::Region> regions;
  for (const RegionConfig& r : config.regions) {
    regions.push_back({r.id, residency::TerritorySet(r.territories.begin(), r.territories.end())});
  }
  EXPECT_TRUE(residency::ValidateRegions(regions).ok()) << residency::ValidateRegions(regions);
  for (const routing::RuleInfo& rule : routing->seed_rules) {
    residency::ResidencyRule checked;
    checked.territory = rule.territory;
    checked.allowed_regions = rule.region_ids;
    checked.readable_from.insert(rule.readable_from.begin(), rule.readable_from.end());
    checked.version = 1;
    EXPECT_TRUE(residency::ValidateRule(checked, regions).ok())
        << rule.territory << ": " << residency::ValidateRule(checked, regions);
  }
}

TEST_F(HelmChartTest, DatabaseConnectionsAreVerifiedTlsWithTheirPasswordsOutOfTheConfiguration) {
  const std::string text = ConfigText(*france_);
  EXPECT_THAT(text, ::testing::Not(HasSubstr("password=")));
  const MedgateConfig config = ParseConfig(text);
  std::vector<std::string> conninfos = {config.control_db->conninfo};
  for (const RegionConfig& region : config.regions) {
    conninfos.push_back(region.db.conninfo);
    conninfos.push_back(region.keys_db->conninfo);
  }
  for (const std::string& conninfo : conninfos) {
    EXPECT_THAT(conninfo, HasSubstr("passfile=/run/medgate/secrets/pgpass")) << conninfo;
    EXPECT_THAT(conninfo, HasSubstr("sslmode=verify-full")) << conninfo;
    EXPECT_THAT(conninfo, HasSubstr("sslrootcert=/etc/medgate/db-ca/ca.crt")) << conninfo;
  }
  EXPECT_THAT(config.regions[0].db.conninfo, HasSubstr("host=pg-fr-1.fr.medgate.example "));
  EXPECT_THAT(config.regions[0].keys_db->conninfo,
              HasSubstr("host=pg-fr-1-keys.fr.medgate.example "));
}

// Every file the configuration names is in a volume the pod mounts, from the right Secret, and
// every certificate carries the identity the configuration expects of its service.
TEST_F(HelmChartTest, EachPodMountsAndIsIssuedWhatItsConfigurationNames) {
  const MedgateConfig config = ParseConfig(ConfigText(*france_));
  std::map<std::string, std::string> uri_of_secret;
  for (const YAML::Node& cert : OfKind(*france_, "Certificate")) {
    ASSERT_EQ(cert["spec"]["uris"].size(), 1u);
    uri_of_secret[cert["spec"]["secretName"].as<std::string>()] =
        cert["spec"]["uris"][0].as<std::string>();
  }
  for (const std::string& name : kDeployments) {
    SCOPED_TRACE(name);
    const YAML::Node pod = Named(*france_, "Deployment", "medgate-" + name)["spec"]["template"]["spec"];
    ASSERT_EQ(pod["containers"].size(), 1u);
    const YAML::Node container = pod["containers"][0];
    const std::map<std::string, std::string> mounts = Mounts(container);
    std::vector<std::string> command;
    for (const YAML::Node& arg : container["command"]) command.push_back(arg.as<std::string>());
    ASSERT_EQ(command.size(), 3u);
    EXPECT_EQ(command[0], "/usr/local/bin/medgate-" + name);
    EXPECT_EQ(command[1], "--config");
    // The configuration it reads is the pod's own copy, made at its start from the ConfigMap by
    // the init container: a ConfigMap volume changes in place, under the running binary's probes.
    ASSERT_EQ(mounts.count(Dir(command[2])), 1u);
    const std::string copy = mounts.at(Dir(command[2]));
    EXPECT_TRUE(Volume(pod, copy)["emptyDir"].IsDefined()) << copy;
    ASSERT_EQ(pod["initContainers"].size(), 1u);
    const YAML::Node init = pod["initContainers"][0];
    const std::map<std::string, std::string> init_mounts = Mounts(init);
    std::string copied_from;
    for (const auto& [path, volume] : init_mounts) {
      const YAML::Node v = Volume(pod, volume);
      if (v["configMap"].IsDefined() && v["configMap"]["name"].as<std::string>() == "medgate-config") {
        copied_from = path;
      }
    }
    ASSERT_FALSE(copied_from.empty()) << "the init container does not mount the ConfigMap";
    ASSERT_EQ(init_mounts.count(Dir(command[2])), 1u);
    EXPECT_EQ(init_mounts.at(Dir(command[2])), copy);
    EXPECT_THAT(init["command"][2].as<std::string>(),
                HasSubstr(absl::StrCat("install -m 0444 ", copied_from, "/medgate.yaml ",
                                       command[2], "\n")));
    EXPECT_EQ(mounts.count(copied_from), 0u) << "the service reads the ConfigMap itself";
    // Its probes read the same copy.
    for (const char* probe : {"readinessProbe", "livenessProbe"}) {
      const YAML::Node exec = container[probe]["exec"]["command"];
      ASSERT_GE(exec.size(), 3u) << probe;
      EXPECT_EQ(exec[2].as<std::string>(), command[2]) << probe;
    }

    const std::vector<std::string> served =
        name == "sharing" ? std::vector<std::string>{"sharing", "audit"}
                          : std::vector<std::string>{name};
    std::set<int> container_ports;
    for (const YAML::Node& p : container["ports"]) container_ports.insert(p["containerPort"].as<int>());
    for (const std::string& service : served) {
      const ServiceEndpoint& endpoint = **config.Service(service);
      EXPECT_EQ(container_ports.count(PortOf(endpoint.listen)), 1u) << service;
      EXPECT_EQ(Dir(endpoint.tls.cert_path), Dir(endpoint.tls.key_path));
      ASSERT_EQ(mounts.count(Dir(endpoint.tls.cert_path)), 1u) << endpoint.tls.cert_path;
      const std::string secret =
          Volume(pod, mounts.at(Dir(endpoint.tls.cert_path)))["secret"]["secretName"].as<std::string>();
      EXPECT_EQ(secret, "medgate-" + service + "-tls");
      ASSERT_EQ(uri_of_secret.count(secret), 1u) << secret;
      EXPECT_EQ(uri_of_secret[secret], endpoint.identity);
      EXPECT_EQ(endpoint.identity, "spiffe://fr.medgate.example/service/" + service);
    }
    // The CA: from the pod's own certificate Secret.
    ASSERT_EQ(mounts.count(Dir(config.ca_path)), 1u);
    EXPECT_EQ(Volume(pod, mounts.at(Dir(config.ca_path)))["secret"]["secretName"].as<std::string>(),
              "medgate-" + name + "-tls");
    // The password file (and sharing's key-encryption key): copied by the init container into
    // memory, mode 0400, and mounted read-only where the configuration names them. The password
    // file is the service's own role's, not the schema owner's the migrations use.
    const std::string pgpass = "/run/medgate/secrets/pgpass";
    ASSERT_EQ(mounts.count(Dir(pgpass)), 1u);
    EXPECT_EQ(Volume(pod, mounts.at(Dir(pgpass)))["emptyDir"]["medium"].as<std::string>(), "Memory");
    const std::string script = init["command"][2].as<std::string>();
    EXPECT_THAT(script, HasSubstr("install -m 0400 /etc/medgate/secrets/db/pgpass " + pgpass));
    EXPECT_EQ(Volume(pod, Mounts(init).at("/etc/medgate/secrets/db"))["secret"]["secretName"]
                  .as<std::string>(),
              "medgate-" + name + "-pgpass");
    if (name == "sharing") {
      const absl::StatusOr<sharing::SharingSettings> sharing = sharing::ParseSharingSettings(config);
      ASSERT_TRUE(sharing.ok());
      EXPECT_THAT(script, HasSubstr("install -m 0400 /etc/medgate/secrets/kek/kek.hex " +
                                    sharing->kek_file));
      EXPECT_EQ(Volume(pod, Mounts(init).at("/etc/medgate/secrets/kek"))["secret"]["secretName"]
                    .as<std::string>(),
                "medgate-kek");
      EXPECT_THAT(sharing->previous_kek_files, IsEmpty());
    } else {
      EXPECT_THAT(script, ::testing::Not(HasSubstr("kek")));
      EXPECT_EQ(Mounts(init).count("/etc/medgate/secrets/kek"), 0u);
    }
    // The databases' CA, for sslrootcert.
    ASSERT_EQ(mounts.count("/etc/medgate/db-ca"), 1u);
    EXPECT_EQ(Volume(pod, mounts.at("/etc/medgate/db-ca"))["secret"]["secretName"].as<std::string>(),
              "medgate-db-ca");
  }
}

TEST_F(HelmChartTest, EachServiceReachesThePodsThatServeIt) {
  const MedgateConfig config = ParseConfig(ConfigText(*france_));
  for (const std::string& name : kServices) {
    SCOPED_TRACE(name);
    const YAML::Node service = Named(*france_, "Service", "medgate-" + name);
    const ServiceEndpoint& endpoint = **config.Service(name);
    // Clients dial the Service's name and port.
    EXPECT_EQ(endpoint.address,
              absl::StrCat("medgate-", name, ".health.svc.cluster.local:", PortOf(endpoint.listen)));
    ASSERT_EQ(service["spec"]["ports"].size(), 1u);
    EXPECT_EQ(service["spec"]["ports"][0]["port"].as<int>(), PortOf(endpoint.listen));
    const std::string target = service["spec"]["ports"][0]["targetPort"].as<std::string>();
    // The pods it selects: audit's are sharing's.
    const std::string serving = name == "audit" ? "sharing" : name;
    const YAML::Node deployment = Named(*france_, "Deployment", "medgate-" + serving);
    const YAML::Node labels = deployment["spec"]["template"]["metadata"]["labels"];
    // It selects these pods, and no other Deployment's: a selector without a label would select
    // none, and one of the labels every pod shares would send the clients to every pod.
    const YAML::Node selector = service["spec"]["selector"];
    ASSERT_TRUE(selector.IsMap() && selector.size() > 0) << "the Service selects no pods";
    auto selects = [&selector](const YAML::Node& pod_labels) {
      for (const auto& kv : selector) {
        const YAML::Node value = pod_labels[kv.first.as<std::string>()];
        if (!value || value.as<std::string>() != kv.second.as<std::string>()) return false;
      }
      return true;
    };
    EXPECT_TRUE(selects(labels));
    for (const YAML::Node& other : OfKind(*france_, "Deployment")) {
      if (other["metadata"]["name"].as<std::string>() == "medgate-" + serving) continue;
      EXPECT_FALSE(selects(other["spec"]["template"]["metadata"]["labels"]))
          << "it also selects the pods of " << other["metadata"]["name"].as<std::string>();
    }
    bool named_port = false;
    for (const YAML::Node& p : deployment["spec"]["template"]["spec"]["containers"][0]["ports"]) {
      if (p["name"].as<std::string>() == target) {
        named_port = true;
        EXPECT_EQ(p["containerPort"].as<int>(), PortOf(endpoint.listen));
      }
    }
    EXPECT_TRUE(named_port) << target;
  }
}

TEST_F(HelmChartTest, PodsRunWithoutPrivilegeAndDrainBeforeTheyAreKilled) {
  const MedgateConfig config = ParseConfig(ConfigText(*france_));
  for (const std::string& name : kDeployments) {
    SCOPED_TRACE(name);
    const YAML::Node pod = Named(*france_, "Deployment", "medgate-" + name)["spec"]["template"]["spec"];
    EXPECT_TRUE(pod["securityContext"]["runAsNonRoot"].as<bool>());
    EXPECT_NE(pod["securityContext"]["runAsUser"].as<int>(), 0);
    EXPECT_FALSE(pod["automountServiceAccountToken"].as<bool>());
    // On SIGTERM: the preStop wait, then one drain (the sharing pods drain sharing and audit at
    // once: sharing_test's ATerminationSignalDrainsSharingAndAuditAtOnce).
    const YAML::Node container = pod["containers"][0];
    const YAML::Node pre_stop = container["lifecycle"]["preStop"]["exec"]["command"];
    ASSERT_EQ(pre_stop.size(), 2u);
    EXPECT_EQ(pre_stop[0].as<std::string>(), "/bin/sleep");
    // The example's services are behind load balancers: its pods wait out their health checks.
    EXPECT_EQ(pre_stop[1].as<int>(), 30);
    EXPECT_GT(pod["terminationGracePeriodSeconds"].as<int>(),
              pre_stop[1].as<int>() + config.limits.drain_seconds);
    for (const YAML::Node& c : {container, pod["initContainers"][0]}) {
      const YAML::Node security = c["securityContext"];
      EXPECT_FALSE(security["allowPrivilegeEscalation"].as<bool>());
      EXPECT_TRUE(security["readOnlyRootFilesystem"].as<bool>());
      ASSERT_EQ(security["capabilities"]["drop"].size(), 1u);
      EXPECT_EQ(security["capabilities"]["drop"][0].as<std::string>(), "ALL");
      EXPECT_TRUE(c["resources"]["limits"]["memory"].IsScalar());
    }
    // Ready and alive: the binary's own probes ask every server of the pod (ctl_test runs them);
    // started: the service's port listens.
    for (const auto& [probe, flag] : {std::pair<std::string, std::string>{"readinessProbe", "--probe"},
                                      {"livenessProbe", "--liveness"}}) {
      std::vector<std::string> command;
      for (const YAML::Node& arg : container[probe]["exec"]["command"]) {
        command.push_back(arg.as<std::string>());
      }
      EXPECT_EQ(command,
                (std::vector<std::string>{container["command"][0].as<std::string>(), "--config",
                                          container["command"][2].as<std::string>(), flag,
                                          name == "sharing" ? "sharing,audit" : name}))
          << probe;
      // The probe gives up on a server after its deadline; the orchestrator must wait longer.
      EXPECT_GT(container[probe]["timeoutSeconds"].as<int>(),
                absl::ToInt64Seconds(flag == "--liveness" ? kLivenessDeadline : kProbeDeadline))
          << probe;
    }
    EXPECT_EQ(container["startupProbe"]["tcpSocket"]["port"].as<std::string>(), name);
  }
  EXPECT_FALSE(OfKind(*france_, "ServiceAccount")[0]["automountServiceAccountToken"].as<bool>());
}

// One peer of a NetworkPolicy rule: "cidr:CIDR", "pods:COMPONENT" (this release's pods), or "dns"
// (the cluster DNS pods in kube-system).
std::string PeerName(const YAML::Node& peer) {
  if (peer["ipBlock"]) return "cidr:" + peer["ipBlock"]["cidr"].as<std::string>();
  const YAML::Node labels = peer["podSelector"]["matchLabels"];
  if (labels["app.kubernetes.io/component"]) {
    return "pods:" + labels["app.kubernetes.io/component"].as<std::string>();
  }
  if (labels["k8s-app"] && labels["k8s-app"].as<std::string>() == "kube-dns" &&
      peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as<std::string>() ==
          "kube-system") {
    return "dns";
  }
  return "other:" + YAML::Dump(peer);
}

// Whether a policy's podSelector selects pods labelled `labels`.
bool Selects(const YAML::Node& policy, const YAML::Node& labels) {
  for (const auto& kv : policy["spec"]["podSelector"]["matchLabels"]) {
    const YAML::Node value = labels[kv.first.as<std::string>()];
    if (!value || value.as<std::string>() != kv.second.as<std::string>()) return false;
  }
  return true;
}

// Everywhere pods labelled `labels` may connect, as "PEER PROTOCOL/PORT": the union of the
// egress rules of every policy that selects them, as Kubernetes applies them.
std::set<std::string> EgressOf(const Render& render, const YAML::Node& labels) {
  std::set<std::string> allowed;
  for (const YAML::Node& policy : OfKind(render, "NetworkPolicy")) {
    if (!Selects(policy, labels)) continue;
    for (const YAML::Node& rule : policy["spec"]["egress"]) {
      EXPECT_TRUE(rule["to"] && rule["ports"]) << "a rule open to every peer or port: "
                                               << YAML::Dump(rule);
      for (const YAML::Node& peer : rule["to"]) {
        for (const YAML::Node& port : rule["ports"]) {
          allowed.insert(absl::StrCat(PeerName(peer), " ", port["protocol"].as<std::string>(), "/",
                                      port["port"].as<std::string>()));
        }
      }
    }
  }
  return allowed;
}

// The labels of a service's pods.
YAML::Node PodLabels(const Render& render, const std::string& service) {
  return Named(render, "Deployment", "medgate-" + service)["spec"]["template"]["metadata"]["labels"];
}

TEST_F(HelmChartTest, MigrationsRunBeforeInstallAndEveryUpgradeOnTheSameDatabases) {
  const YAML::Node job = Named(*france_, "Job", "medgate-migrate");
  EXPECT_EQ(job["metadata"]["annotations"]["helm.sh/hook"].as<std::string>(),
            "pre-install,pre-upgrade");
  const YAML::Node config_map = Named(*france_, "ConfigMap", "medgate-migrate-config");
  EXPECT_EQ(config_map["metadata"]["annotations"]["helm.sh/hook"].as<std::string>(),
            "pre-install,pre-upgrade");
  // The configuration the Job reads exists before it does, and names the same databases.
  EXPECT_LT(std::stoi(config_map["metadata"]["annotations"]["helm.sh/hook-weight"].as<std::string>()),
            std::stoi(job["metadata"]["annotations"]["helm.sh/hook-weight"].as<std::string>()));
  EXPECT_EQ(ConfigText(*france_, "medgate-migrate-config"), ConfigText(*france_));
  const YAML::Node pod = job["spec"]["template"]["spec"];
  EXPECT_EQ(pod["restartPolicy"].as<std::string>(), "Never");
  const std::string script = pod["containers"][0]["command"][2].as<std::string>();
  EXPECT_THAT(script, HasSubstr("medgate-migrate --config /etc/medgate/config/medgate.yaml "
                                "--migrations /usr/local/share/medgate/migrations"));
  EXPECT_EQ(Volume(pod, "config")["configMap"]["name"].as<std::string>(), "medgate-migrate-config");
  // The schema owner's password file is the migrations' alone.
  EXPECT_EQ(Volume(pod, "db-secret")["secret"]["secretName"].as<std::string>(), "medgate-pgpass");
  // Its way to the databases comes with it, from the same values: on an upgrade it runs before
  // the release's own policies change.
  const YAML::Node policy = Named(*france_, "NetworkPolicy", "medgate-migrate");
  EXPECT_EQ(policy["metadata"]["annotations"]["helm.sh/hook"].as<std::string>(),
            "pre-install,pre-upgrade");
  EXPECT_LT(std::stoi(policy["metadata"]["annotations"]["helm.sh/hook-weight"].as<std::string>()),
            std::stoi(job["metadata"]["annotations"]["helm.sh/hook-weight"].as<std::string>()));
  const YAML::Node job_labels = job["spec"]["template"]["metadata"]["labels"];
  for (const auto& kv : policy["spec"]["podSelector"]["matchLabels"]) {
    EXPECT_EQ(job_labels[kv.first.as<std::string>()].as<std::string>(), kv.second.as<std::string>());
  }
  // Every database, of every kind, and DNS.
  EXPECT_EQ(EgressOf(*france_, job_labels),
            (std::set<std::string>{"cidr:10.20.0.0/24 TCP/5432", "cidr:10.20.1.0/24 TCP/5432",
                                   "cidr:10.20.2.0/24 TCP/5432", "dns UDP/53", "dns TCP/53"}));
}

// The migrations' pod goes where the services' pods go: on nodes set aside (and tainted) for
// them, with the annotations ops give pods (a service mesh's opt-out, say).
TEST_F(HelmChartTest, TheMigrationsJobIsScheduledLikeTheServices) {
  const Render placed = RenderChart(
      "nodeSelector: {medgate.example/pool: health}\n"
      "tolerations: [{key: dedicated, operator: Equal, value: health, effect: NoSchedule}]\n"
      "podAnnotations: {sidecar.istio.io/inject: \"false\"}\n");
  ASSERT_EQ(placed.exit_code, 0) << placed.error;
  const YAML::Node job = Named(placed, "Job", "medgate-migrate")["spec"]["template"];
  const YAML::Node routing = Named(placed, "Deployment", "medgate-routing")["spec"]["template"];
  for (const YAML::Node& pod : {job, routing}) {
    EXPECT_EQ(pod["spec"]["nodeSelector"]["medgate.example/pool"].as<std::string>(), "health");
    ASSERT_EQ(pod["spec"]["tolerations"].size(), 1u);
    EXPECT_EQ(pod["spec"]["tolerations"][0]["key"].as<std::string>(), "dedicated");
    EXPECT_EQ(pod["metadata"]["annotations"]["sidecar.istio.io/inject"].as<std::string>(), "false");
  }
  // Without them, none.
  const YAML::Node plain = Named(*france_, "Job", "medgate-migrate")["spec"]["template"];
  EXPECT_FALSE(plain["spec"]["nodeSelector"]);
  EXPECT_FALSE(plain["spec"]["tolerations"]);
}

// The peers of one ingress rule: "pods:COMPONENT" or "cidr:CIDR".
std::set<std::string> Peers(const YAML::Node& rule) {
  std::set<std::string> peers;
  for (const YAML::Node& from : rule["from"]) peers.insert(PeerName(from));
  return peers;
}

// port -> who may connect to it, for one service's pods.
std::map<int, std::set<std::string>> IngressOf(const Render& render, const std::string& name) {
  std::map<int, std::set<std::string>> allowed;
  const YAML::Node policy = Named(render, "NetworkPolicy", "medgate-" + name);
  for (const YAML::Node& rule : policy["spec"]["ingress"]) {
    EXPECT_EQ(rule["ports"].size(), 1u);
    allowed[rule["ports"][0]["port"].as<int>()] = Peers(rule);
  }
  return allowed;
}

TEST_F(HelmChartTest, NetworkPoliciesLetInOnlyTheNamedClientsAndLetOutOnlyToTheDatabases) {
  const YAML::Node deny = Named(*france_, "NetworkPolicy", "medgate-default-deny");
  EXPECT_FALSE(deny["spec"]["ingress"].IsDefined());
  EXPECT_FALSE(deny["spec"]["egress"].IsDefined());
  std::vector<std::string> types;
  for (const YAML::Node& t : deny["spec"]["policyTypes"]) types.push_back(t.as<std::string>());
  EXPECT_THAT(types, UnorderedElementsAre("Ingress", "Egress"));
  // Routing: the services that call it, the apps' networks, and ops (tenants, residency rules).
  using Allowed = std::map<int, std::set<std::string>>;
  EXPECT_EQ(IngressOf(*france_, "routing"),
            (Allowed{{8443, {"pods:consent", "pods:ingest", "pods:sharing", "cidr:198.51.100.0/24",
                             "cidr:10.30.0.0/16"}}}));
  EXPECT_EQ(IngressOf(*france_, "consent"), (Allowed{{8443, {"cidr:198.51.100.0/24"}}}));
  EXPECT_EQ(IngressOf(*france_, "ingest"), (Allowed{{8443, {"cidr:0.0.0.0/0"}}}));
  // Sharing and audit on their own ports, each from its own clients.
  EXPECT_EQ(IngressOf(*france_, "sharing"),
            (Allowed{{8443, {"cidr:198.51.100.0/24"}}, {8444, {"cidr:10.30.0.0/16"}}}));
  // Out: DNS, the routing service, and the databases each service's role may connect to (see
  // EachServicesPodsReachOnlyTheDatabasesItsRoleMayConnectTo), on the databases' ports only.
  const std::set<std::string> dns = {"dns UDP/53", "dns TCP/53"};
  const std::string control = "cidr:10.20.0.0/24 TCP/5432";
  const std::string shards = "cidr:10.20.1.0/24 TCP/5432";
  const std::string vaults = "cidr:10.20.2.0/24 TCP/5432";
  const std::string routing = "pods:routing TCP/8443";
  auto with_dns = [&dns](std::set<std::string> peers) {
    peers.insert(dns.begin(), dns.end());
    return peers;
  };
  EXPECT_EQ(EgressOf(*france_, PodLabels(*france_, "routing")), with_dns({control, shards}));
  // No policy keeps the name of the earlier chart's, which let every pod reach every database:
  // narrowed in place, it would refuse connections until the per-service ones exist. A new name
  // makes an upgrade create those first and delete it last.
  for (const YAML::Node& policy : OfKind(*france_, "NetworkPolicy")) {
    EXPECT_NE(policy["metadata"]["name"].as<std::string>(), "medgate-egress");
  }
  EXPECT_EQ(EgressOf(*france_, PodLabels(*france_, "consent")), with_dns({shards, routing}));
  EXPECT_EQ(EgressOf(*france_, PodLabels(*france_, "ingest")), with_dns({shards, routing}));
  EXPECT_EQ(EgressOf(*france_, PodLabels(*france_, "sharing")),
            with_dns({control, shards, vaults, routing}));
  // Each kind on its own databases' ports: a control database on 6432 opens 6432 to the control
  // network only.
  const Render other_port = RenderChart("control: {port: 6432}\n");
  ASSERT_EQ(other_port.exit_code, 0) << other_port.error;
  EXPECT_EQ(EgressOf(other_port, PodLabels(other_port, "sharing")),
            with_dns({"cidr:10.20.0.0/24 TCP/6432", shards, vaults, routing}));
  EXPECT_EQ(EgressOf(other_port, PodLabels(other_port, "ingest")), with_dns({shards, routing}));

  // A service no client network is named for accepts no one (consent here): default deny.
  const Render closed = RenderChart(
      "services: {consent: {clientCIDRs: [], serviceType: ClusterIP}}\n"
      "networkPolicy: {dns: {peers: [{ipBlock: {cidr: 169.254.20.10/32}}]}}\n");
  ASSERT_EQ(closed.exit_code, 0) << closed.error;
  EXPECT_THAT(IngressOf(closed, "consent"), IsEmpty());
  // Another cluster's DNS (NodeLocal DNSCache) is named in the values.
  EXPECT_EQ(EgressOf(closed, PodLabels(closed, "consent")),
            (std::set<std::string>{"cidr:169.254.20.10/32 UDP/53", "cidr:169.254.20.10/32 TCP/53",
                                   shards, routing}));
}

// The roles the migrations let connect to one kind of database: the `allowed` array of its
// *_database_connect.sql migration.
std::set<std::string> RolesThatMayConnect(const std::string& kind_dir) {
  std::set<std::string> roles;
  const std::string dir = std::string(MEDGATE_SOURCE_DIR) + "/migrations/" + kind_dir;
  for (const auto& file : std::filesystem::directory_iterator(dir)) {
    if (!absl::EndsWith(file.path().string(), "_database_connect.sql")) continue;
    const std::string sql = ReadFile(file.path().string());
    const std::string opening = "allowed text[] := ARRAY[";
    const size_t at = sql.find(opening);
    EXPECT_NE(at, std::string::npos) << file.path();
    if (at == std::string::npos) continue;
    const size_t from = at + opening.size();
    for (absl::string_view role : absl::StrSplit(sql.substr(from, sql.find(']', from) - from), ',')) {
      roles.insert(std::string(absl::StripAsciiWhitespace(absl::StripPrefix(
          absl::StripSuffix(absl::StripAsciiWhitespace(role), "'"), "'"))));
    }
  }
  EXPECT_FALSE(roles.empty()) << "no database_connect migration in " << dir;
  return roles;
}

// Defence in depth beside the database roles: a pod can open a connection only to the databases
// its service's role may log in to. Ingest and consent, which hold no data keys, cannot reach a
// key vault, nor the control database.
TEST_F(HelmChartTest, EachServicesPodsReachOnlyTheDatabasesItsRoleMayConnectTo) {
  const std::map<std::string, std::string> networks = {{"control", "cidr:10.20.0.0/24 TCP/5432"},
                                                       {"shard", "cidr:10.20.1.0/24 TCP/5432"},
                                                       {"vault", "cidr:10.20.2.0/24 TCP/5432"}};
  std::map<std::string, std::set<std::string>> may_connect;  // kind -> roles
  for (const auto& [kind, network] : networks) may_connect[kind] = RolesThatMayConnect(kind);
  for (const std::string& service : kDeployments) {
    SCOPED_TRACE(service);
    const std::set<std::string> egress = EgressOf(*france_, PodLabels(*france_, service));
    for (const auto& [kind, network] : networks) {
      EXPECT_EQ(egress.count(network) == 1, may_connect[kind].count("medgate_" + service) == 1)
          << kind;
    }
    // Nothing else but DNS and the routing service.
    for (const std::string& peer : egress) {
      EXPECT_TRUE(absl::StartsWith(peer, "dns ") || peer == "pods:routing TCP/8443" ||
                  absl::c_any_of(networks, [&peer](const auto& n) { return n.second == peer; }))
          << peer;
    }
  }
  // The roles read as the chart assumes: a vault only sharing may reach, shards every service.
  EXPECT_EQ(may_connect["vault"], (std::set<std::string>{"medgate_sharing"}));
  EXPECT_EQ(may_connect["shard"].size(), 4u);
}

TEST_F(HelmChartTest, ALoadBalancerKeepsTheClientsAddressesAndAcceptsOnlyTheirNetworks) {
  for (const std::string name : {"ingest", "sharing"}) {
    SCOPED_TRACE(name);
    const YAML::Node spec = Named(*france_, "Service", "medgate-" + name)["spec"];
    EXPECT_EQ(spec["type"].as<std::string>(), "LoadBalancer");
    EXPECT_EQ(spec["externalTrafficPolicy"].as<std::string>(), "Local");
    std::set<std::string> ranges;
    for (const YAML::Node& r : spec["loadBalancerSourceRanges"]) ranges.insert(r.as<std::string>());
    EXPECT_EQ(ranges, (std::set<std::string>{name == "ingest" ? "0.0.0.0/0" : "198.51.100.0/24"}));
  }
  // Audit, for ops only, behind the cloud's internal load balancer (the Service's annotation),
  // from the ops network.
  const YAML::Node audit = Named(*france_, "Service", "medgate-audit");
  EXPECT_EQ(audit["spec"]["type"].as<std::string>(), "LoadBalancer");
  EXPECT_EQ(audit["metadata"]["annotations"]["service.beta.kubernetes.io/"
                                             "openstack-internal-load-balancer"]
                .as<std::string>(),
            "true");
  std::set<std::string> ops;
  for (const YAML::Node& r : audit["spec"]["loadBalancerSourceRanges"]) ops.insert(r.as<std::string>());
  EXPECT_EQ(ops, (std::set<std::string>{"10.30.0.0/16"}));
  // A ClusterIP Service has neither, nor annotations unless given.
  const YAML::Node consent =
      Named(RenderChart("services: {consent: {serviceType: ClusterIP}}\n"), "Service",
            "medgate-consent");
  EXPECT_EQ(consent["spec"]["type"].as<std::string>(), "ClusterIP");
  EXPECT_FALSE(consent["spec"]["externalTrafficPolicy"].IsDefined());
  EXPECT_FALSE(consent["spec"]["loadBalancerSourceRanges"].IsDefined());
  EXPECT_FALSE(consent["metadata"]["annotations"].IsDefined());
}

TEST_F(HelmChartTest, OnlyServicesWithSeveralReplicasHaveADisruptionBudget) {
  EXPECT_EQ(Named(*france_, "PodDisruptionBudget", "medgate-routing")["spec"]["maxUnavailable"]
                .as<int>(),
            1);
  const Render single = RenderChart("services: {routing: {replicas: 1}}\n");
  ASSERT_EQ(single.exit_code, 0) << single.error;
  std::set<std::string> budgets;
  for (const YAML::Node& pdb : OfKind(single, "PodDisruptionBudget")) {
    budgets.insert(pdb["metadata"]["name"].as<std::string>());
  }
  EXPECT_EQ(budgets, (std::set<std::string>{"medgate-consent", "medgate-ingest", "medgate-sharing"}));
  // A share of the replicas, as Kubernetes takes it: a string.
  const Render share = RenderChart("podDisruptionBudget: {maxUnavailable: \"25%\"}\n");
  ASSERT_EQ(share.exit_code, 0) << share.error;
  EXPECT_EQ(Named(share, "PodDisruptionBudget", "medgate-ingest")["spec"]["maxUnavailable"]
                .as<std::string>(),
            "25%");
}

// A user's affinity (to pin the services to dedicated nodes, say) is added to the replicas'
// spreading over nodes, not put in its place: one block goes to all four services, and no term of
// the user's could name each one's own pods.
TEST_F(HelmChartTest, AUsersAffinityKeepsTheReplicasSpreadOverNodes) {
  const Render pinned = RenderChart(
      "affinity:\n"
      "  nodeAffinity:\n"
      "    requiredDuringSchedulingIgnoredDuringExecution:\n"
      "      nodeSelectorTerms:\n"
      "        - matchExpressions: [{key: medgate.example/pool, operator: In, values: [hds]}]\n"
      "  podAntiAffinity:\n"
      "    preferredDuringSchedulingIgnoredDuringExecution:\n"
      "      - weight: 50\n"
      "        podAffinityTerm:\n"
      "          topologyKey: topology.kubernetes.io/zone\n"
      "          labelSelector: {matchLabels: {app.kubernetes.io/name: medgate}}\n");
  for (const std::string& name : kDeployments) {
    SCOPED_TRACE(name);
    const YAML::Node affinity =
        Named(pinned, "Deployment", "medgate-" + name)["spec"]["template"]["spec"]["affinity"];
    EXPECT_EQ(affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                      ["nodeSelectorTerms"][0]["matchExpressions"][0]["key"]
                          .as<std::string>(),
              "medgate.example/pool");
    const YAML::Node preferred =
        affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    ASSERT_EQ(preferred.size(), 2u);
    EXPECT_EQ(preferred[0]["podAffinityTerm"]["topologyKey"].as<std::string>(),
              "kubernetes.io/hostname");
    EXPECT_EQ(preferred[0]["podAffinityTerm"]["labelSelector"]["matchLabels"]
                      ["app.kubernetes.io/component"]
                          .as<std::string>(),
              name);
    EXPECT_EQ(preferred[1]["weight"].as<int>(), 50);
    EXPECT_EQ(preferred[1]["podAffinityTerm"]["topologyKey"].as<std::string>(),
              "topology.kubernetes.io/zone");
  }
  // Without one, the spreading alone.
  const YAML::Node plain =
      Named(*france_, "Deployment", "medgate-ingest")["spec"]["template"]["spec"]["affinity"];
  EXPECT_FALSE(plain["nodeAffinity"].IsDefined());
  EXPECT_EQ(plain["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"].size(), 1u);
}

// A changed configuration rolls the pods that read it: scaling ingest changes ingest.instances,
// which only ingest reads, so the other services keep their pods; any other change rolls them all.
TEST_F(HelmChartTest, ScalingIngestRollsOnlyIngestWhileOtherChangesRollEveryService) {
  auto checksums = [](const Render& render) {
    std::map<std::string, std::string> sums;
    for (const std::string& name : kDeployments) {
      sums[name] = Named(render, "Deployment", "medgate-" + name)["spec"]["template"]["metadata"]
                       ["annotations"]["checksum/config"]
                           .as<std::string>("");
      EXPECT_EQ(sums[name].size(), 64u) << name << ": " << sums[name];
    }
    return sums;
  };
  const std::map<std::string, std::string> before = checksums(*france_);
  const Render scaled = RenderChart("services: {ingest: {replicas: 7}}\n");
  ASSERT_EQ(scaled.exit_code, 0) << scaled.error;
  EXPECT_THAT(ConfigText(scaled), HasSubstr("instances: 7"));
  const std::map<std::string, std::string> after_scaling = checksums(scaled);
  EXPECT_NE(after_scaling.at("ingest"), before.at("ingest"));
  for (const char* name : {"routing", "consent", "sharing"}) {
    EXPECT_EQ(after_scaling.at(name), before.at(name)) << name;
  }
  const Render changed = RenderChart("consent: {settings: {cache: {max_patients: 1234}}}\n");
  ASSERT_EQ(changed.exit_code, 0) << changed.error;
  const std::map<std::string, std::string> after_change = checksums(changed);
  for (const std::string& name : kDeployments) {
    EXPECT_NE(after_change.at(name), before.at(name)) << name;
  }
}

// A KEK rotation: the previous KEKs, keys of the same Secret, are copied into memory next to the
// KEK and named in sharing.previous_kek_files, as the sharing service's own parser reads them.
TEST_F(HelmChartTest, ARotationsPreviousKeksReachTheSharingPodsOnly) {
  const Render rotating = RenderChart(
      "sharing: {kekKey: kek-2027.hex, previousKekKeys: [kek-2026.hex, kek-2025.hex]}\n");
  ASSERT_EQ(rotating.exit_code, 0) << rotating.error;
  const absl::StatusOr<sharing::SharingSettings> settings =
      sharing::ParseSharingSettings(ParseConfig(ConfigText(rotating)));
  ASSERT_TRUE(settings.ok()) << settings.status();
  ASSERT_EQ(settings->previous_kek_files.size(), 2u);
  const YAML::Node pod =
      Named(rotating, "Deployment", "medgate-sharing")["spec"]["template"]["spec"];
  const YAML::Node init = pod["initContainers"][0];
  const std::string script = init["command"][2].as<std::string>();
  const YAML::Node volume = Volume(pod, Mounts(init).at("/etc/medgate/secrets/kek"));
  std::set<std::string> items;
  for (const YAML::Node& item : volume["secret"]["items"]) items.insert(item["key"].as<std::string>());
  EXPECT_EQ(items, (std::set<std::string>{"kek-2027.hex", "kek-2026.hex", "kek-2025.hex"}));
  EXPECT_THAT(script, HasSubstr("install -m 0400 /etc/medgate/secrets/kek/kek-2027.hex " +
                                settings->kek_file));
  const std::vector<std::string> keys = {"kek-2026.hex", "kek-2025.hex"};
  for (size_t i = 0; i < keys.size(); ++i) {
    EXPECT_THAT(script, HasSubstr("install -m 0400 /etc/medgate/secrets/kek/" + keys[i] + " " +
                                  settings->previous_kek_files[i]));
    // Where the service reads it: the in-memory copy the sharing container mounts, named after
    // its key, as the current KEK's is.
    EXPECT_EQ(settings->previous_kek_files[i], "/run/medgate/secrets/keks/" + keys[i]);
  }
  EXPECT_EQ(settings->kek_file, "/run/medgate/secrets/keks/kek-2027.hex");
  const YAML::Node container = pod["containers"][0];
  ASSERT_EQ(Mounts(container).count("/run/medgate/secrets"), 1u);
  EXPECT_EQ(Volume(pod, Mounts(container).at("/run/medgate/secrets"))["emptyDir"]["medium"]
                .as<std::string>(),
            "Memory");
  for (const char* other : {"medgate-routing", "medgate-consent", "medgate-ingest"}) {
    const std::string other_script = Named(rotating, "Deployment", other)["spec"]["template"]["spec"]
                                         ["initContainers"][0]["command"][2]
                                             .as<std::string>();
    EXPECT_THAT(other_script, ::testing::Not(HasSubstr("kek"))) << other;
  }
  for (const auto& [values, refusal] : std::vector<std::pair<std::string, std::string>>{
           {"sharing: {previousKekKeys: [kek.hex]}\n", "sharing.previousKekKeys[0]"},
           {"sharing: {previousKekKeys: [a.hex, a.hex]}\n", "sharing.previousKekKeys: each key once"},
           {"sharing: {kekKey: \"../x\"}\n", "sharing.kekKey"},
           {"sharing: {settings: {kek_rewrap: true}}\n", "sharing.settings.kek_rewrap"},
           {"sharing: {previousKekKeys: [\"../db/pgpass\"]}\n", "sharing.previousKekKeys[0]"},
           {"sharing: {settings: {previous_kek_files: [/x]}}\n",
            "sharing.settings.previous_kek_files: set by the chart"}}) {
    const Render refused = RenderChart(values);
    EXPECT_NE(refused.exit_code, 0) << values;
    EXPECT_THAT(refused.error, HasSubstr(refusal)) << values;
  }
}

TEST_F(HelmChartTest, WithoutCertManagerThePodsUseTheServicesOwnSecrets) {
  const Render render = RenderChart("tls: {certManager: {enabled: false}}\n", "health");
  ASSERT_EQ(render.exit_code, 0) << render.error;
  EXPECT_THAT(OfKind(render, "Certificate"), IsEmpty());
  const YAML::Node pod = Named(render, "Deployment", "health-medgate-sharing")["spec"]["template"]["spec"];
  EXPECT_EQ(Volume(pod, "tls-sharing")["secret"]["secretName"].as<std::string>(),
            "health-medgate-sharing-tls");
  EXPECT_EQ(Volume(pod, "tls-audit")["secret"]["secretName"].as<std::string>(),
            "health-medgate-audit-tls");
  // The release name is in every name the configuration dials.
  EXPECT_EQ((*ParseConfig(ConfigText(render, "health-medgate-config")).Service("audit"))->address,
            "health-medgate-audit.health.svc.cluster.local:8444");
}

// With a Secret of CRLs, every service reads them from where its pods mount that Secret, whole
// (a CRL added later appears there); without one, the configuration names no CRL directory.
TEST_F(HelmChartTest, ACrlSecretReachesEveryServiceWhereItsConfigurationLooksForCrls) {
  EXPECT_EQ(ParseConfig(ConfigText(*france_)).crl_dir, "");
  for (const std::string& name : kDeployments) {
    const YAML::Node pod =
        Named(*france_, "Deployment", "medgate-" + name)["spec"]["template"]["spec"];
    for (const YAML::Node& v : pod["volumes"]) {
      EXPECT_NE(v["name"].as<std::string>(), "crl") << name;
    }
  }
  const Render render = RenderChart("tls: {crlSecret: medgate-ca-crls}\n");
  ASSERT_EQ(render.exit_code, 0) << render.error;
  const MedgateConfig config = ParseConfig(ConfigText(render));
  ASSERT_FALSE(config.crl_dir.empty());
  for (const std::string& name : kServices) {
    absl::StatusOr<const ServiceEndpoint*> endpoint = config.Service(name);
    ASSERT_TRUE(endpoint.ok()) << name;
    EXPECT_EQ((*endpoint)->tls.crl_dir, config.crl_dir) << name;
  }
  for (const std::string& name : kDeployments) {
    SCOPED_TRACE(name);
    const YAML::Node pod =
        Named(render, "Deployment", "medgate-" + name)["spec"]["template"]["spec"];
    const std::map<std::string, std::string> mounts = Mounts(pod["containers"][0]);
    ASSERT_EQ(mounts.count(config.crl_dir), 1u);
    const YAML::Node volume = Volume(pod, mounts.at(config.crl_dir));
    EXPECT_EQ(volume["secret"]["secretName"].as<std::string>(), "medgate-ca-crls");
    EXPECT_FALSE(volume["secret"]["items"].IsDefined()) << "every CRL of the Secret, not some";
  }
}

// Values that would give a cluster storing data where the residency rules do not allow, or one
// that cannot start, stop the rendering with a message naming the value: nothing is deployed.
TEST_F(HelmChartTest, ValuesThatCannotMakeAWorkingClusterAreRefusedByName) {
  struct Case {
    std::string overrides;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"country: null\n", "country: the ISO 3166-1 alpha-2 code"},
      {"country: France\n", "country: 'France' is not an ISO 3166-1 alpha-2 code"},
      // YAML 1.1, as Helm reads values: Norway's code unquoted is a boolean.
      {"country: NO\n", "country: 'false' is not an ISO 3166-1 alpha-2 code: quote it"},
      {"country: DE\n", "regions: no region may hold data of DE"},
      {"trustDomain: null\n", "trustDomain: the SPIFFE trust domain"},
      {"image: {repository: null}\n", "image.repository: the medgate image is required"},
      {"database: {passfileSecret: null}\n", "database.passfileSecret"},
      {"database: {servicePassfileSecrets: {ingest: null}}\n",
       "database.servicePassfileSecrets.ingest: a Secret with key pgpass holding the "
       "medgate_ingest role's password is required"},
      {"database: {servicePassfileSecrets: {consent: medgate-pgpass}}\n",
       "database.servicePassfileSecrets.consent: 'medgate-pgpass' is database.passfileSecret, "
       "the schema owner's"},
      {"database: {servicePassfileSecrets: {sharing: medgate-ingest-pgpass}}\n",
       "database.servicePassfileSecrets.sharing: 'medgate-ingest-pgpass' is also ingest's"},
      {"database: {caSecret: null}\n", "database.caSecret: a Secret with key ca.crt"},
      {"database: {options: \"sslmode=require\"}\n",
       "database.options: 'sslmode=require' must set sslmode=verify-full"},
      {"database: {options: \"sslmode=verify-ca\"}\n",
       "database.options: 'sslmode=verify-ca' must set sslmode=verify-full"},
      {"database: {options: \"sslmode=verify-full password=secret\"}\n",
       "database.options: 'password' may not be set here"},
      {"database: {options: \"sslmode=verify-full sslcert=client.crt\"}\n",
       "database.options: 'sslcert' may not be set here"},
      {"database: {options: \"sslmode=verify-full sslrootcert=/tmp/x\"}\n",
       "database.options: 'sslrootcert=/tmp/x' is not a libpq keyword=value without quotes, "
       "spaces or paths"},
      {"database: {options: \"sslmode=verify-full sslmode=disable\"}\n",
       "database.options: 'sslmode=disable': sslmode must be verify-full"},
      {"database: {options: \"sslmode=verify-full ssl_min_protocol_version=TLSv1\"}\n",
       "database.options: 'ssl_min_protocol_version=TLSv1': TLSv1.2 or TLSv1.3 only"},
      {"database: {options: \"sslmode=verify-full application_name='a b'\"}\n",
       "is not a libpq keyword=value"},
      {"sharing: {kekSecret: null}\n", "sharing.kekSecret"},
      {"sharing: {settings: {kek_env: KEK}}\n", "sharing.settings.kek_env: set by the chart"},
      {"routing: {settings: {seed_rules: []}}\n", "routing.settings.seed_rules: set by the chart"},
      {"ingest: {settings: {device_cache_ttl_seconds: 60}}\n",
       "routing.settings.device_reassign_wait_seconds (35) must exceed "
       "ingest.settings.device_cache_ttl_seconds (60)"},
      {"routing: {settings: {device_reassign_wait_seconds: 0}}\n",
       "routing.settings.device_reassign_wait_seconds (0) must exceed "
       "ingest.settings.device_cache_ttl_seconds (30)"},
      {"tls: {certManager: {issuerRef: {name: null}}}\n", "tls.certManager.issuerRef.name"},
      {"regions: []\n", "regions: at least one region is required"},
      {"regions: [{id: fr-1, territories: [FR], db: {host: a}}]\n",
       "regions[0].keysDb: region 'fr-1' needs its key vault"},
      {"regions: [{id: fr-1, territories: [], db: {host: a}, keysDb: {host: b}}]\n",
       "regions[0].territories: region 'fr-1' must name the territories"},
      {"regions: [{id: fr-1, territories: [FR, fr], db: {host: a}, keysDb: {host: b}}]\n",
       "regions[0].territories[1]: 'fr' is not an ISO 3166-1 alpha-2 code"},
      {"regions: [{id: fr-1, territories: [FR, NO], db: {host: a}, keysDb: {host: b}}]\n",
       "regions[0].territories[1]: 'false' is not an ISO 3166-1 alpha-2 code: quote it"},
      {"regions: [{id: fr-1, territories: [FR], db: {host: a}, keysDb: {host: b}},\n"
       "          {id: fr-1, territories: [BE], db: {host: c}, keysDb: {host: d}}]\n",
       "regions[1].id: region 'fr-1' is listed twice"},
      {"regions: [{id: abcdefghijklmnopqrstuvwxyz01234, territories: [FR], db: {host: a}, "
       "keysDb: {host: b}}]\n",
       "regions[0].id: 'abcdefghijklmnopqrstuvwxyz01234' is over 30 characters"},
      {"routing: {seedRules: [{territory: FR, regions: [de-1]}]}\n",
       "routing.seedRules[0].regions: 'de-1' is not one of this cluster's regions (fr-1, eu-1)"},
      {"routing: {seedRules: [{territory: FR, regions: [eu-1]}]}\n",
       "routing.seedRules[0].regions: region 'eu-1' may not hold data of FR (its territories: BE, "
       "NL, LU)"},
      {"routing: {seedRules: [{territory: FR, regions: [fr-1], readableFrom: [France]}]}\n",
       "routing.seedRules[0].readableFrom[0]: 'France' is not"},
      {"control: {host: \"pg password=x\"}\n",
       "control.host: 'pg password=x' may hold only letters, digits"},
      {"control: {port: 99999}\n", "control.port: 99999 is not a TCP port"},
      {"control: {port: 0}\n", "control.port: 0 is not a TCP port"},
      {"services: {ingest: {port: 70000}}\n", "services.ingest.port: 70000 is not a TCP port"},
      {"services: {audit: {port: 8443}}\n", "services.audit.port"},
      {"services: {billing: {port: 1}}\n", "services.billing: not a medgate service"},
      {"services: {sharing: {clientCIDRs: []}}\n",
       "services.sharing.clientCIDRs: a LoadBalancer service needs the networks"},
      {"networkPolicy: {databaseCIDRs: {shards: []}}\n",
       "networkPolicy.databaseCIDRs.shards: the networks of the regions' shards are required"},
      {"networkPolicy: {databaseCIDRs: {keyVaults: null}}\n",
       "networkPolicy.databaseCIDRs.keyVaults: the networks of the regions' key vaults are "
       "required"},
      {"networkPolicy: {databaseCIDRs: {control: [10.20.0.0]}}\n",
       "networkPolicy.databaseCIDRs.control[0]: '10.20.0.0' is not a network in CIDR notation"},
      {"networkPolicy: {databaseCIDRs: {control: 10.20.0.0/24}}\n",
       "networkPolicy.databaseCIDRs.control: '10.20.0.0/24' is not a list of networks"},
      // The form of one list for every database would let every pod reach the key vaults.
      {"networkPolicy: {databaseCIDRs: [10.20.0.0/16]}\n",
       "networkPolicy.databaseCIDRs: name the networks of each kind of database apart"},
      {"networkPolicy: {databaseCIDRs: {vaults: [10.20.3.0/24]}}\n",
       "networkPolicy.databaseCIDRs.vaults: not a kind of database (control, shards, keyVaults)"},
      {"services: {ingest: {clientCIDRs: [\"0.0.0.0/0}\"]}}\n",
       "services.ingest.clientCIDRs[0]: '0.0.0.0/0}' is not a network in CIDR notation"},
      {"podDisruptionBudget: {maxUnavailable: 0}\n",
       "podDisruptionBudget.maxUnavailable: '0' must be a whole number of pods (at least 1)"},
      {"affinity: {podAntiAfinity: {}}\n",
       "affinity.podAntiAfinity: not nodeAffinity, podAffinity or podAntiAffinity"},
      // A budget of no pod blocks every node drain.
      {"podDisruptionBudget: {maxUnavailable: \"0%\"}\n",
       "podDisruptionBudget.maxUnavailable: '0%' must be a whole number of pods (at least 1) or a "
       "percentage from 1% to 100%"},
      {"podDisruptionBudget: {maxUnavailable: \"101%\"}\n",
       "podDisruptionBudget.maxUnavailable: '101%'"},
      // Every database is one of its own: two regions on one shard, a region on the control
      // database, a key vault on its shard's server.
      {"regions: [{id: fr-1, territories: [FR], db: {host: a, dbname: m, user: u}, keysDb: {host: "
       "b, dbname: k, user: u}},\n"
       "          {id: eu-1, territories: [BE], db: {host: a, port: 5432, dbname: m, user: u}, "
       "keysDb: {host: d, dbname: k, user: u}}]\n",
       "regions[1].db: a:5432/m is also regions[0].db's: each region's shard and key vault, and "
       "the control database, are databases of their own"},
      {"control: {host: c, dbname: m}\n"
       "regions: [{id: fr-1, territories: [FR], db: {host: c, dbname: m, user: u}, keysDb: {host: "
       "b, dbname: k, user: u}}]\n",
       "regions[0].db: c:5432/m is also control's"},
      {"regions: [{id: fr-1, territories: [FR], db: {host: a, dbname: m, user: u}, keysDb: {host: "
       "a, dbname: k, user: u}}]\n",
       "regions[0].keysDb: on the server of the shard of region 'fr-1' (a:5432): the key vault is "
       "a server apart"},
      {"networkPolicy: {databaseCIDRs: {shards: [0.0.0.0/0]}}\n",
       "networkPolicy.databaseCIDRs.shards[0]: '0.0.0.0/0' is every address"},
      {"networkPolicy: {databaseCIDRs: {keyVaults: [10.20.2.0/24, \"::/0\"]}}\n",
       "networkPolicy.databaseCIDRs.keyVaults[1]: '::/0' is every address"},
      {"networkPolicy: {dns: {peers: []}}\n", "networkPolicy.dns.peers: the cluster DNS pods"},
      {"networkPolicy: {dns: {ports: []}}\n", "networkPolicy.dns.ports: the DNS ports"},
      {"networkPolicy: {dns: {peers: [{namespaceSelector: {}, podSelector: {matchLabels: "
       "{k8s-app: kube-dns}}}]}}\n",
       "networkPolicy.dns.peers[0]: an empty namespaceSelector is every namespace"},
      {"clusterDomain: \"cluster.local\\n    - evil.example\"\n",
       "clusterDomain: 'cluster.local\n    - evil.example' is not a DNS domain"},
      {"image: {pullPolicy: \"Always\\n  privileged: true\"}\n",
       "image.pullPolicy: 'Always\n  privileged: true' is not Always, IfNotPresent or Never"},
      {"ingest: {settings: {instances: 5}}\n",
       "ingest.settings.instances: set by the chart from services.ingest.replicas"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.overrides);
    const Render render = RenderChart(c.overrides);
    EXPECT_EQ(render.exit_code, 1);
    EXPECT_THAT(render.error, HasSubstr(c.message));
  }
}

TEST_F(HelmChartTest, TheChartDefaultsAloneRenderNothing) {
  // Without a country's values there is no cluster to describe: the first missing value is named.
  const std::string err = testing::TempDir() + "/helm-defaults-err.txt";
  const test_support::ShellRun run =
      test_support::RunShell(absl::StrCat(MEDGATE_HELM_RENDER, " ", kChart, " 2>", err));
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(ReadFile(err), HasSubstr("is required"));
}

}  // namespace
}  // namespace medgate
