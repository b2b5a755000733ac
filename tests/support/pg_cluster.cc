// Starts throwaway PostgreSQL servers by copying a cached initdb template; see pg_cluster.h.
#include "tests/support/pg_cluster.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/magic.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <pwd.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <pqxx/pqxx>
#include <random>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "libs/common/status_macros.h"
#include "libs/pg/database_roles.h"

extern char** environ;

namespace medgate::test_support {
namespace {

// Part of the template's directory name: bump it whenever the template's content changes, so a
// template cached by an older build is never used.
constexpr char kTemplateFormat[] = "v1";
constexpr char kFallbackBindir[] = "/usr/lib/postgresql/15/bin";
constexpr char kServerUserWhenRoot[] = "postgres";
constexpr char kSuperuser[] = "medgate";
constexpr char kDatabase[] = "medgate";
constexpr char kClusterConf[] = "medgate_cluster.conf";
constexpr char kPgCtlTimeoutSeconds[] = "60";
// A port that was free when probed can be taken before the server binds it.
constexpr int kStartAttempts = 5;

// Appended to the template's postgresql.conf. Port and socket directory differ per cluster and come
// from the included file.
constexpr char kServerSettings[] = R"(
# --- medgate test cluster (tests/support/pg_cluster.cc) ---
# The data is throwaway: durability is traded for start-up and write speed.
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
listen_addresses = '127.0.0.1'
max_connections = 200
shared_buffers = 32MB
timezone = 'UTC'
include_if_exists = 'medgate_cluster.conf'
)";

// Replaces initdb's pg_hba.conf. TCP needs the password; the Unix socket sits in the cluster's
// private directory and is used once, by PgCluster itself, to set that password.
constexpr char kPgHba[] =
    R"(# medgate test cluster (tests/support/pg_cluster.cc)
local all all trust
host all all 127.0.0.1/32 scram-sha-256
)";

// Runs as the server user in its own session, reparented to init, so that neither Ctrl-C nor a test
// runner killing the test's process tree takes it down. $1 pg_ctl, $2 data dir, $3 dir.
constexpr char kWatchdogScript[] = R"(read -r line
[ "$line" = done ] && exit 0
"$1" stop -D "$2" -m immediate -w -t 60 -s </dev/null >/dev/null 2>&1
rm -rf -- "$3"
)";

// Who runs the PostgreSQL binaries: ourselves, or `postgres` when we are root.
struct ServerUser {
  bool switch_user = false;
  uid_t uid = 0;
  gid_t gid = 0;
};

struct PgInstall {
  std::string bindir;
  std::string version;   // e.g. "15.20"
  std::string tmp_base;  // See ChooseTmpBase().
  ServerUser user;

  std::string Bin(absl::string_view tool) const { return absl::StrCat(bindir, "/", tool); }
};

absl::Status ErrnoError(absl::string_view what, absl::string_view path, int err) {
  return absl::InternalError(
      absl::StrCat("pg_cluster: ", what, " ", path, ": ", std::strerror(err)));
}

std::string Join(const std::vector<std::string>& argv) { return absl::StrJoin(argv, " "); }

// Only async-signal-safe calls are allowed between fork and exec: another thread may have held the
// malloc lock at the time of the fork.
[[noreturn]] void ChildFail(const char* message) {
  ssize_t ignored = write(2, message, std::strlen(message));
  (void)ignored;
  _exit(127);
}

struct SpawnOptions {
  const ServerUser* user = nullptr;  // Drop to this user if it says so.
  int stdin_fd = -1;                 // -1: /dev/null.
  int output_fd = -1;                // stdout and stderr; -1: /dev/null.
  // New session, and a double fork so the process is reparented to init: it outlives us and is not
  // part of our process tree. Spawn then returns 0 instead of a pid.
  bool detach = false;
};

// fork + exec rather than posix_spawn: dropping to the server user has to happen in the child.
// Every descriptor we open is O_CLOEXEC, so a child only inherits what dup2 hands it.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const SpawnOptions& options) {
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  int dev_null = open("/dev/null", O_RDWR | O_CLOEXEC);
  if (dev_null < 0) return ErrnoError("cannot open", "/dev/null", errno);
  const int in = options.stdin_fd >= 0 ? options.stdin_fd : dev_null;
  const int out = options.output_fd >= 0 ? options.output_fd : dev_null;
  const bool switch_user = options.user != nullptr && options.user->switch_user;
  const uid_t uid = switch_user ? options.user->uid : 0;
  const gid_t gid = switch_user ? options.user->gid : 0;
  const bool detach = options.detach;

  pid_t pid = fork();
  if (pid == 0) {
    if (detach) {
      if (setsid() < 0) ChildFail("pg_cluster: setsid failed\n");
      pid_t grandchild = fork();
      if (grandchild < 0) ChildFail("pg_cluster: fork failed\n");
      if (grandchild > 0) _exit(0);
    }
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(out, 2) < 0) {
      ChildFail("pg_cluster: dup2 failed\n");
    }
    // The server user may not be allowed into the test's working directory.
    if (chdir("/") != 0) ChildFail("pg_cluster: chdir / failed\n");
    if (switch_user && (setgroups(1, &gid) != 0 || setgid(gid) != 0 || setuid(uid) != 0)) {
      ChildFail("pg_cluster: cannot switch to the PostgreSQL server user\n");
    }
    execve(args[0], args.data(), environ);
    ChildFail("pg_cluster: exec failed\n");
  }
  int fork_errno = errno;
  close(dev_null);
  if (pid < 0) return ErrnoError("cannot fork for", argv[0], fork_errno);
  if (detach) {
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      return absl::InternalError(absl::StrCat("pg_cluster: cannot detach ", Join(argv)));
    }
    return 0;
  }
  return pid;
}

// Runs a command to completion and returns its combined stdout and stderr; a non-zero exit is an
// error carrying that output. `input`, if any, is the command's stdin.
absl::StatusOr<std::string> Run(const std::vector<std::string>& argv, const ServerUser* user,
                                absl::string_view input = {}) {
  // A memfd, not a pipe, for stdin: the child may exit without reading it, and writing to a pipe
  // nobody reads would raise SIGPIPE in the test process.
  int in = -1;
  if (!input.empty()) {
    in = memfd_create("pg_cluster_stdin", MFD_CLOEXEC);
    if (in < 0) return ErrnoError("cannot create", "memfd", errno);
    if (write(in, input.data(), input.size()) != static_cast<ssize_t>(input.size()) ||
        lseek(in, 0, SEEK_SET) != 0) {
      int err = errno;
      close(in);
      return ErrnoError("cannot fill", "memfd", err);
    }
  }
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) {
    int err = errno;
    if (in >= 0) close(in);
    return ErrnoError("cannot create", "pipe", err);
  }
  absl::StatusOr<pid_t> pid =
      Spawn(argv, {.user = user, .stdin_fd = in, .output_fd = out[1], .detach = false});
  close(out[1]);
  if (in >= 0) close(in);
  if (!pid.ok()) {
    close(out[0]);
    return pid.status();
  }
  std::string output;
  char buf[4096];
  for (;;) {
    ssize_t n = read(out[0], buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    output.append(buf, static_cast<size_t>(n));
  }
  close(out[0]);
  int status = 0;
  while (waitpid(*pid, &status, 0) < 0) {
    if (errno != EINTR) return ErrnoError("cannot wait for", argv[0], errno);
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::InternalError(absl::StrCat("pg_cluster: `", Join(argv), "` failed (",
                                            WIFEXITED(status)
                                                ? absl::StrCat("exit ", WEXITSTATUS(status))
                                                : absl::StrCat("signal ", WTERMSIG(status)),
                                            "): ", output));
  }
  return output;
}

// Hands a file or directory we created as root to the server user.
absl::Status GiveToServerUser(const std::string& path, const ServerUser& user) {
  if (!user.switch_user) return absl::OkStatus();
  if (chown(path.c_str(), user.uid, user.gid) != 0) {
    return ErrnoError("cannot chown", path, errno);
  }
  return absl::OkStatus();
}

absl::Status WriteFile(const std::string& path, absl::string_view content, int flags,
                       const ServerUser& user) {
  int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC | flags, 0600);
  if (fd < 0) return ErrnoError("cannot open", path, errno);
  bool ok = write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size());
  int err = errno;
  if (close(fd) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (!ok) return ErrnoError("cannot write", path, err);
  return GiveToServerUser(path, user);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open", path, errno);
  std::string content;
  char buf[4096];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    content.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return content;
}

absl::StatusOr<std::string> MakeTempDir(const PgInstall& install, absl::string_view prefix) {
  std::string path = absl::StrCat(install.tmp_base, "/", prefix, "XXXXXX");
  if (mkdtemp(path.data()) == nullptr) return ErrnoError("cannot create", path, errno);
  if (absl::Status status = GiveToServerUser(path, install.user); !status.ok()) {
    rmdir(path.c_str());
    return status;
  }
  return path;
}

void RemoveTree(const std::string& path) {
  std::error_code ignored;
  std::filesystem::remove_all(path, ignored);
}

std::optional<std::string> FindInPath(absl::string_view program) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return std::nullopt;
  for (absl::string_view dir : absl::StrSplit(path, ':', absl::SkipEmpty())) {
    std::string candidate = absl::StrCat(dir, "/", program);
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return std::nullopt;
}

bool HasServerBinaries(const std::string& bindir) {
  for (const char* tool : {"initdb", "pg_ctl", "postgres"}) {
    if (access(absl::StrCat(bindir, "/", tool).c_str(), X_OK) != 0) return false;
  }
  return true;
}

// Where cluster directories and the template go. Memory beats disk by far: a cluster is ~1300
// files, and creating files is what disks are slowest at (seconds per cluster on some CI disks,
// against a tenth of a second on tmpfs), for the copy and for every CREATE TABLE after it.
std::string ChooseTmpBase() {
  if (const char* dir = std::getenv("MEDGATE_PG_TMPDIR"); dir != nullptr && *dir != '\0') {
    return dir;
  }
  // Only a shared, sticky /dev/shm (as the server user must reach it) with room for a few sets of
  // clusters; containers often give it just 64 MB.
  constexpr uint64_t kMinFreeBytes = uint64_t{2} << 30;
  struct statfs fs;
  struct stat st;
  if (statfs("/dev/shm", &fs) == 0 && fs.f_type == TMPFS_MAGIC &&
      static_cast<uint64_t>(fs.f_bavail) * fs.f_bsize >= kMinFreeBytes &&
      stat("/dev/shm", &st) == 0 && (st.st_mode & 01777) == 01777 &&
      access("/dev/shm", W_OK | X_OK) == 0) {
    return "/dev/shm";
  }
  const char* tmpdir = std::getenv("TMPDIR");
  return tmpdir != nullptr && *tmpdir != '\0' ? tmpdir : "/tmp";
}

absl::StatusOr<PgInstall> DiscoverInstall() {
  PgInstall install;
  install.tmp_base = ChooseTmpBase();

  if (geteuid() == 0) {
    struct passwd pwd;
    struct passwd* found = nullptr;
    char buf[4096];
    if (getpwnam_r(kServerUserWhenRoot, &pwd, buf, sizeof(buf), &found) != 0 || found == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("pg_cluster: running as root, but there is no '", kServerUserWhenRoot,
                       "' user to run PostgreSQL as (PostgreSQL refuses to run as root)"));
    }
    install.user = {.switch_user = true, .uid = pwd.pw_uid, .gid = pwd.pw_gid};
  } else {
    install.user = {.switch_user = false, .uid = geteuid(), .gid = getegid()};
  }

  // MEDGATE_PG_BINDIR wins; then pg_config (which may belong to a libpq-dev of another major
  // version without a server, hence the check); then Debian's path for PostgreSQL 15.
  if (const char* env = std::getenv("MEDGATE_PG_BINDIR"); env != nullptr && *env != '\0') {
    install.bindir = env;
  } else {
    if (std::optional<std::string> pg_config = FindInPath("pg_config")) {
      absl::StatusOr<std::string> out = Run({*pg_config, "--bindir"}, nullptr);
      if (out.ok()) install.bindir = std::string(absl::StripAsciiWhitespace(*out));
    }
    if (!HasServerBinaries(install.bindir)) install.bindir = kFallbackBindir;
  }
  if (!HasServerBinaries(install.bindir)) {
    return absl::FailedPreconditionError(
        absl::StrCat("pg_cluster: no PostgreSQL server binaries (initdb, pg_ctl, postgres) "
                     "in ",
                     install.bindir, "; install postgresql-15 or set MEDGATE_PG_BINDIR"));
  }

  // "postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)" -> "15.20".
  ASSIGN_OR_RETURN(std::string version, Run({install.Bin("postgres"), "--version"}, nullptr));
  std::vector<std::string> words =
      absl::StrSplit(version, absl::ByAnyChar(" \n"), absl::SkipEmpty());
  if (words.size() < 3) {
    return absl::InternalError(
        absl::StrCat("pg_cluster: unexpected postgres --version: ", version));
  }
  for (char c : words[2]) {
    if (absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.') install.version += c;
  }
  return install;
}

// Discovered once per process; later callers share the answer, failure included.
const absl::StatusOr<PgInstall>& Install() {
  static const auto* install = new absl::StatusOr<PgInstall>(DiscoverInstall());
  return *install;
}

// What a complete template holds; a template that no longer matches (a crashed copy, or a /tmp
// cleaner that removed old files) is rebuilt rather than trusted.
absl::StatusOr<std::string> Manifest(const std::string& data_dir) {
  uintmax_t files = 0;
  uintmax_t bytes = 0;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(data_dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_regular_file(ec)) {
      ++files;
      bytes += it->file_size(ec);
    }
  }
  if (ec) return ErrnoError("cannot list", data_dir, ec.value());
  return absl::StrCat("files=", files, " bytes=", bytes, "\n");
}

absl::Status ValidateTemplate(const PgInstall& install, const std::string& dir) {
  struct stat st;
  if (lstat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::NotFoundError(dir);
    return ErrnoError("cannot stat", dir, errno);
  }
  // The name is predictable and /tmp is shared: only trust a private directory of the server user,
  // and never delete someone else's.
  if (!S_ISDIR(st.st_mode) || st.st_uid != install.user.uid || (st.st_mode & 077) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("pg_cluster: refusing to use template ", dir,
                                                      ": not a directory of uid ", install.user.uid,
                                                      " with mode 0700; remove it"));
  }
  absl::StatusOr<std::string> recorded = ReadFile(dir + "/manifest");
  absl::StatusOr<std::string> actual = Manifest(dir + "/data");
  if (!recorded.ok() || !actual.ok() || *recorded != *actual) {
    return absl::DataLossError(absl::StrCat("pg_cluster: template ", dir, " is incomplete"));
  }
  return absl::OkStatus();
}

// Fills `staging` with an initdb'd data directory (data/) and its manifest.
absl::Status FillTemplate(const PgInstall& install, const std::string& staging) {
  const std::string data = staging + "/data";
  RETURN_IF_ERROR(Run({install.Bin("initdb"), "-D", data, "-U", kSuperuser, "--auth=trust",
                       "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions",
                       // 1 MB WAL segments instead of 16: a smaller directory to copy.
                       "--wal-segsize=1"},
                      &install.user)
                      .status());
  RETURN_IF_ERROR(WriteFile(data + "/postgresql.conf", kServerSettings, O_APPEND, install.user));
  RETURN_IF_ERROR(WriteFile(data + "/pg_hba.conf", kPgHba, O_TRUNC, install.user));
  // Single-user mode creates the database without a listening server, and exits when its stdin
  // ends, even if we die meanwhile. exit_on_error turns a failed statement into a non-zero exit.
  RETURN_IF_ERROR(
      Run({install.Bin("postgres"), "--single", "-D", data, "-c", "exit_on_error=on", "postgres"},
          &install.user, absl::StrCat("CREATE DATABASE ", kDatabase, ";\n"))
          .status());
  ASSIGN_OR_RETURN(std::string manifest, Manifest(data));
  return WriteFile(staging + "/manifest", manifest, O_CREAT | O_EXCL, install.user);
}

// initdb into a private staging directory, then rename into place: a reader sees a complete
// template or none, whatever happens to the builder.
absl::Status BuildTemplate(const PgInstall& install, const std::string& dir) {
  ASSIGN_OR_RETURN(std::string staging, MakeTempDir(install, "medgate-pg-template-"));
  absl::Status status = FillTemplate(install, staging);
  if (status.ok() && rename(staging.c_str(), dir.c_str()) != 0) {
    status = ErrnoError("cannot rename template to", dir, errno);
  }
  if (!status.ok()) {
    RemoveTree(staging);
    if (install.user.switch_user) {
      return absl::Status(status.code(),
                          absl::StrCat(status.message(), " (running as root: ", install.tmp_base,
                                       " must be reachable by user ", kServerUserWhenRoot, ")"));
    }
  }
  return status;
}

absl::StatusOr<std::string> PrepareTemplate(const PgInstall& install) {
  const std::string dir = absl::StrCat(install.tmp_base, "/medgate-pg-template-", kTemplateFormat,
                                       "-", install.version, "-uid", geteuid());
  // Test binaries run in parallel (ctest -j) and would all initdb at once on a cold cache: the
  // first builds, the others wait on the lock and then find its template. The lock goes with
  // the descriptor, so a builder that dies releases it.
  const std::string lock_path = dir + ".lock";
  int lock = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (lock < 0) return ErrnoError("cannot open", lock_path, errno);
  while (flock(lock, LOCK_EX) != 0) {
    if (errno != EINTR) {
      int err = errno;
      close(lock);
      return ErrnoError("cannot lock", lock_path, err);
    }
  }
  absl::Status valid = ValidateTemplate(install, dir);
  if (absl::IsDataLoss(valid)) {
    // Incomplete, e.g. a /tmp cleaner removed old files: rebuild. Moved aside first, so that a
    // process that validated it just before cannot copy it half-deleted.
    const std::string stale = absl::StrCat(dir, ".stale-", getpid());
    if (rename(dir.c_str(), stale.c_str()) == 0) RemoveTree(stale);
    valid = absl::NotFoundError(dir);
  }
  if (absl::IsNotFound(valid)) valid = BuildTemplate(install, dir);
  close(lock);  // Releases the lock.
  if (!valid.ok()) return valid;
  return dir;
}

const absl::StatusOr<std::string>& Template() {
  static const auto* dir = new absl::StatusOr<std::string>(
      Install().ok() ? PrepareTemplate(*Install())
                     : absl::StatusOr<std::string>(Install().status()));
  return *dir;
}

absl::StatusOr<int> PickFreePort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ErrnoError("cannot create", "socket", errno);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    int err = errno;
    close(fd);
    return ErrnoError("cannot bind", "127.0.0.1:0", err);
  }
  close(fd);
  return ntohs(addr.sin_port);
}

// Letters and digits only, so it needs no quoting in a connection string or SQL literal.
std::string RandomPassword() {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  std::random_device random;
  std::uniform_int_distribution<size_t> pick(0, sizeof(kAlphabet) - 2);
  std::string password;
  for (int i = 0; i < 24; ++i) password += kAlphabet[pick(random)];
  return password;
}

// Quotes a libpq keyword/value connection string value.
std::string QuoteConnValue(absl::string_view value) {
  std::string quoted = "'";
  for (char c : value) {
    if (c == '\'' || c == '\\') quoted += '\\';
    quoted += c;
  }
  return quoted + "'";
}

// A postgresql.conf string literal: single quotes are doubled.
std::string QuoteConfValue(absl::string_view value) {
  std::string quoted = "'";
  for (char c : value) {
    if (c == '\'') quoted += '\'';
    quoted += c;
  }
  return quoted + "'";
}

std::string SanitizeName(absl::string_view name) {
  std::string clean;
  for (char c : name) {
    clean += absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' ? c : '_';
  }
  return clean.empty() ? "cluster" : clean;
}

// The end of what the server logged since `offset`: the reason a start failed.
std::string LogTail(const std::string& path, size_t offset) {
  absl::StatusOr<std::string> log = ReadFile(path);
  if (!log.ok()) return "(no server log)";
  absl::string_view tail(*log);
  tail.remove_prefix(std::min(offset, tail.size()));
  if (tail.size() > 2000) tail.remove_prefix(tail.size() - 2000);
  return std::string(tail);
}

size_t FileSize(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? static_cast<size_t>(st.st_size) : 0;
}

}  // namespace

PgCluster::PgCluster(std::string name) : name_(std::move(name)) {}

absl::StatusOr<std::unique_ptr<PgCluster>> PgCluster::Start(std::string name) {
  // Not make_unique: the constructor is private.
  std::unique_ptr<PgCluster> cluster(new PgCluster(std::move(name)));
  // On failure the destructor cleans up whatever Create got as far as.
  RETURN_IF_ERROR(cluster->Create());
  return cluster;
}

absl::Status PgCluster::Create() {
  if (!Install().ok()) return Install().status();
  if (!Template().ok()) return Template().status();
  const PgInstall& install = *Install();

  ASSIGN_OR_RETURN(dir_,
                   MakeTempDir(install, absl::StrCat("medgate-pg-", SanitizeName(name_), "-")));

  // The watchdog comes first so that even a crash during the steps below leaves nothing behind.
  int sockets[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sockets) != 0) {
    return ErrnoError("cannot create", "socketpair", errno);
  }
  absl::StatusOr<pid_t> watchdog =
      Spawn({"/bin/sh", "-c", kWatchdogScript, "medgate-pg-watchdog", install.Bin("pg_ctl"),
             data_dir(), dir_},
            {.user = &install.user, .stdin_fd = sockets[1], .output_fd = -1, .detach = true});
  close(sockets[1]);
  if (!watchdog.ok()) {
    close(sockets[0]);
    return watchdog.status();
  }
  watchdog_fd_ = sockets[0];

  // Run as the server user so the copy is owned by it without a chown pass.
  RETURN_IF_ERROR(
      Run({"/bin/cp", "-a", *Template() + "/data", data_dir()}, &install.user).status());
  const std::string run_dir = dir_ + "/run";
  if (mkdir(run_dir.c_str(), 0700) != 0) return ErrnoError("cannot create", run_dir, errno);
  RETURN_IF_ERROR(GiveToServerUser(run_dir, install.user));

  absl::Status started;
  for (int attempt = 0; attempt < kStartAttempts; ++attempt) {
    ASSIGN_OR_RETURN(port_, PickFreePort());
    std::string conf = absl::StrCat("port = ", port_,
                                    "\nunix_socket_directories = ", QuoteConfValue(run_dir), "\n");
    RETURN_IF_ERROR(WriteFile(absl::StrCat(data_dir(), "/", kClusterConf), conf, O_CREAT | O_TRUNC,
                              install.user));
    started = StartServer();
    if (started.ok() || !absl::StrContains(started.message(), "Address already in use")) break;
  }
  if (!started.ok()) return started;
  password_ = RandomPassword();
  return SetPassword();
}

absl::Status PgCluster::StartServer() {
  const PgInstall& install = *Install();
  size_t log_offset = FileSize(log_path());
  // -w polls until the server accepts connections (or the timeout), so no sleeps here.
  absl::StatusOr<std::string> out = Run({install.Bin("pg_ctl"), "start", "-D", data_dir(), "-l",
                                         log_path(), "-w", "-t", kPgCtlTimeoutSeconds, "-s"},
                                        &install.user);
  if (!out.ok()) {
    return absl::UnavailableError(absl::StrCat("pg_cluster: cannot start cluster ", name_,
                                               " on port ", port_, ": ", out.status().message(),
                                               "\n--- server log ", log_path(), " ---\n",
                                               LogTail(log_path(), log_offset)));
  }
  running_ = true;
  return absl::OkStatus();
}

// Each cluster gets its own password (the template has none), set over the private Unix socket.
// The services' roles are made with it, as ops provision them on a production server, before the
// migrations grant them their rights.
absl::Status PgCluster::SetPassword() {
  // ALTER ROLE takes no bind parameters; the password is alphanumeric and quoted anyway.
  std::vector<std::string> statements = {
      absl::StrCat("ALTER ROLE ", kSuperuser, " PASSWORD '", password_, "'")};
  for (absl::string_view role : pg::kServiceRoles) {
    statements.push_back(absl::StrCat("CREATE ROLE ", role, " LOGIN PASSWORD '", password_, "'"));
  }
  return RunAsSuperuser(statements);
}

// Over the private Unix socket, where the superuser needs no password.
std::string PgCluster::SuperuserConnectionString() const {
  return absl::StrCat("host=", QuoteConnValue(dir_ + "/run"), " port=", port_,
                      " dbname=", kDatabase, " user=", kSuperuser, " connect_timeout=5");
}

absl::Status PgCluster::RunAsSuperuser(const std::vector<std::string>& statements) {
  try {
    pqxx::connection connection(SuperuserConnectionString());
    pqxx::nontransaction work(connection);
    for (const std::string& statement : statements) work.exec0(statement);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("pg_cluster: on cluster ", name_, ": ", e.what()));
  }
  return absl::OkStatus();
}

absl::Status PgCluster::UseProductionSettings(const ProductionSettings& settings) {
  std::vector<std::string> statements = {
      "ALTER SYSTEM SET fsync = on",
      "ALTER SYSTEM SET synchronous_commit = on",
      "ALTER SYSTEM SET full_page_writes = on",
      "ALTER SYSTEM SET wal_level = replica",
      "ALTER SYSTEM SET max_wal_senders = 10",
  };
  const std::pair<const char*, std::string> sizes[] = {{"shared_buffers", settings.shared_buffers},
                                                       {"wal_buffers", settings.wal_buffers},
                                                       {"max_wal_size", settings.max_wal_size},
                                                       {"min_wal_size", settings.min_wal_size}};
  for (const auto& [name, value] : sizes) {
    statements.push_back(absl::StrCat("ALTER SYSTEM SET ", name, " = ", QuoteConfValue(value)));
  }
  RETURN_IF_ERROR(RunAsSuperuser(statements));
  // shared_buffers, wal_buffers and wal_level take effect at server start only, and the WAL
  // segment size (the template's 1 MB) changes only on a cleanly stopped server.
  RETURN_IF_ERROR(Stop());
  RETURN_IF_ERROR(Run({Install()->Bin("pg_resetwal"), "-D", data_dir(),
                       absl::StrCat("--wal-segsize=", settings.wal_segment_mb)},
                      &Install()->user)
                      .status());
  RETURN_IF_ERROR(StartAgain());
  RETURN_IF_ERROR(PrepareWalFiles());
  return PrewarmSharedBuffers();
}

// A server that has been running keeps min_wal_size of WAL files for reuse: each checkpoint
// renames the files it no longer needs into future ones. A new server has none, and until its first
// checkpoint recycles some, the backend that fills a file creates the next one, writing 16 MB of
// zeros while every commit waits for it. Creating min_wal_size of files (a row and a WAL switch
// each) and then checkpointing leaves the server as a running one is. Meanwhile max_wal_size is
// raised: with it at min_wal_size, the checkpoints the switches start would remove files as fast
// as the switches create them.
absl::Status PgCluster::PrepareWalFiles() {
  constexpr char kWalFiles[] =
      "SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'";
  try {
    pqxx::connection connection(SuperuserConnectionString());
    pqxx::nontransaction work(connection);
    // pg_settings gives both WAL sizes in MB, the segment size in bytes.
    auto setting = [&](const char* name) {
      return work.exec_params1("SELECT setting::bigint FROM pg_settings WHERE name = $1", name)[0]
          .as<int64_t>();
    };
    auto count = [&](const std::string& query) { return work.exec1(query)[0].as<int64_t>(); };
    const int64_t min_wal_mb = setting("min_wal_size");
    const int64_t max_wal_mb = setting("max_wal_size");
    const int64_t files = min_wal_mb * 1024 * 1024 / setting("wal_segment_size");
    // ALTER SYSTEM takes effect on reload: in this backend between two statements, soon after.
    auto set_max_wal_mb = [&](int64_t mb) -> absl::Status {
      work.exec0(absl::StrCat("ALTER SYSTEM SET max_wal_size = '", mb, "MB'"));
      work.exec("SELECT pg_reload_conf()");
      const absl::Time deadline = absl::Now() + absl::Seconds(5);
      while (setting("max_wal_size") != mb) {
        if (absl::Now() > deadline) {
          return absl::InternalError(absl::StrCat("pg_cluster: on cluster ", name_,
                                                  ": max_wal_size did not become ", mb,
                                                  "MB within 5 s of a reload"));
        }
        absl::SleepFor(absl::Milliseconds(10));
      }
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(set_max_wal_mb(4 * min_wal_mb));
    work.exec0("DROP TABLE IF EXISTS medgate_wal_files");
    work.exec0("CREATE TABLE medgate_wal_files (v int)");
    // The one being written and `files` more, counted rather than assumed from the switches (a
    // timed checkpoint may recycle some meanwhile); each switch creates at most one: bounded.
    for (int64_t switches = 0; count(kWalFiles) < files + 1; ++switches) {
      if (switches > 2 * files) {
        return absl::InternalError(absl::StrCat("pg_cluster: on cluster ", name_, ": ",
                                                switches, " WAL switches made only ",
                                                count(kWalFiles), " of ", files + 1, " files"));
      }
      work.exec0("INSERT INTO medgate_wal_files VALUES (1)");
      work.exec("SELECT pg_switch_wal()");
    }
    work.exec0("DROP TABLE medgate_wal_files");
    work.exec0("CHECKPOINT");
    RETURN_IF_ERROR(set_max_wal_mb(max_wal_mb));
    const int64_t ready =
        count(absl::StrCat(kWalFiles, " AND name >= pg_walfile_name(pg_current_wal_lsn())"));
    if (ready < files) {
      return absl::InternalError(absl::StrCat("pg_cluster: on cluster ", name_, ": only ", ready,
                                              " of ", files, " WAL files are ready for reuse"));
    }
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("pg_cluster: on cluster ", name_, ", preparing WAL files: ", e.what()));
  }
  return absl::OkStatus();
}

// A server that has been running has used every one of its shared buffers. A new one has not
// touched their memory yet: the first use of each buffer page-faulted and the kernel zeroed the
// page, inside the transaction that needed the buffer. Measured with perf during ingest_bench's
// latency run, those faults were 15% of the writer backends' time. Filling a throwaway unlogged
// table (no WAL) with one row per page, as many pages as there are buffers, takes every buffer
// off the free list; rolling its transaction back drops the table and puts the buffers back,
// their memory now in place. pg_buffercache must then count no buffer that was never used, or
// this fails.
absl::Status PgCluster::PrewarmSharedBuffers() {
  try {
    pqxx::connection connection(SuperuserConnectionString());
    // Never committed: whatever happens, the table and the extension go with the rollback.
    pqxx::work work(connection);
    try {
      work.exec0("CREATE EXTENSION IF NOT EXISTS pg_buffercache");
    } catch (const std::exception& e) {
      return absl::FailedPreconditionError(absl::StrCat(
          "pg_cluster: on cluster ", name_,
          ": prewarming the shared buffers needs the pg_buffercache extension (shipped in "
          "Debian's postgresql-15 package): ",
          e.what()));
    }
    const int64_t buffers = work.exec1("SELECT count(*) FROM pg_buffercache")[0].as<int64_t>();
    const int64_t block_size =
        work.exec1("SELECT current_setting('block_size')::bigint")[0].as<int64_t>();
    work.exec0("CREATE UNLOGGED TABLE medgate_prewarm (v text)");
    // Stored in line and uncompressed: 7/8 of a block takes a page of its own.
    work.exec0("ALTER TABLE medgate_prewarm ALTER COLUMN v SET STORAGE PLAIN");
    work.exec_params0(
        "INSERT INTO medgate_prewarm SELECT repeat('x', $1) FROM generate_series(1, $2)",
        block_size * 7 / 8, buffers);
    const int64_t unused =
        work.exec1("SELECT count(*) FROM pg_buffercache WHERE relfilenode IS NULL")[0]
            .as<int64_t>();
    work.abort();
    if (unused > 0) {
      return absl::InternalError(absl::StrCat(
          "pg_cluster: on cluster ", name_, ": ", unused, " of ", buffers,
          " shared buffers were never used after writing as many pages as there are buffers; "
          "see pg_buffercache"));
    }
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("pg_cluster: on cluster ", name_, ", prewarming shared buffers: ", e.what()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> PgCluster::DescribeSettings() {
  std::string description;
  try {
    pqxx::connection connection(ConnectionString());
    pqxx::nontransaction query(connection);
    for (const char* name : {"fsync", "synchronous_commit", "full_page_writes", "wal_level",
                             "shared_buffers", "wal_buffers", "min_wal_size", "max_wal_size",
                             "wal_segment_size"}) {
      absl::StrAppend(&description, description.empty() ? "" : " ", name, "=",
                      query.exec1(absl::StrCat("SHOW ", name))[0].c_str());
    }
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("pg_cluster: on cluster ", name_, ": ", e.what()));
  }
  return description;
}

PgCluster::~PgCluster() {
  bool clean = true;
  if (running_) {
    // Immediate: the data is about to be deleted, a shutdown checkpoint would be wasted.
    absl::StatusOr<std::string> out = Run({Install()->Bin("pg_ctl"), "stop", "-D", data_dir(), "-m",
                                           "immediate", "-w", "-t", kPgCtlTimeoutSeconds, "-s"},
                                          &Install()->user);
    if (!out.ok()) {
      std::fprintf(stderr, "%s\n", out.status().ToString().c_str());
      clean = false;
    }
  }
  if (!dir_.empty() && clean) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
    clean = !ec;
  }
  if (watchdog_fd_ >= 0) {
    // "done" stands the watchdog down; without it (we failed above) it retries the cleanup.
    if (clean) send(watchdog_fd_, "done\n", 5, MSG_NOSIGNAL);
    shutdown(watchdog_fd_, SHUT_WR);
    // Its exit closes the other end: wait for that (briefly) so that no process of ours outlives
    // the cluster object.
    pollfd pfd{.fd = watchdog_fd_, .events = POLLIN, .revents = 0};
    char buf[16];
    while (poll(&pfd, 1, 5000) > 0 && read(watchdog_fd_, buf, sizeof(buf)) > 0) {
    }
    close(watchdog_fd_);
  }
}

std::string PgCluster::ConnectionString(absl::string_view dbname, absl::string_view user) const {
  return absl::StrCat("host=127.0.0.1 port=", port_, " dbname=", dbname, " user=",
                      user.empty() ? kSuperuser : user,
                      " password=", password_, " connect_timeout=5");
}

std::set<std::string> PgCluster::ClientConnections() const {
  pqxx::connection connection(ConnectionString());
  pqxx::nontransaction txn(connection);
  std::set<std::string> out;
  for (const pqxx::row& row :
       txn.exec("SELECT DISTINCT datname || ' ' || usename FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")) {
    out.insert(row[0].c_str());
  }
  return out;
}

std::string PgCluster::log_path() const { return dir_ + "/postgres.log"; }

std::string PgCluster::data_dir() const { return dir_ + "/data"; }

absl::Status PgCluster::Signal(int signal) {
  std::ifstream pid_file(data_dir() + "/postmaster.pid");
  pid_t postmaster = 0;
  pid_file >> postmaster;
  if (postmaster <= 0) {
    return absl::FailedPreconditionError(absl::StrCat("pg_cluster ", name_, ": not running"));
  }
  // The postmaster's children, from /proc/<pid>/stat (the parent pid follows the state, after
  // the command name's closing parenthesis).
  std::vector<pid_t> pids = {postmaster};
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    const size_t paren = line.rfind(')');
    if (paren == std::string::npos || paren + 2 >= line.size()) continue;
    std::istringstream rest(line.substr(paren + 2));
    char state = 0;
    pid_t parent = 0;
    rest >> state >> parent;
    if (parent == postmaster) pids.push_back(static_cast<pid_t>(std::stol(name)));
  }
  for (pid_t pid : pids) {
    if (kill(pid, signal) != 0 && errno != ESRCH) {
      return absl::InternalError(absl::StrCat("pg_cluster ", name_, ": kill(", pid, ", ", signal,
                                              "): ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

absl::Status PgCluster::Stop() {
  if (!running_) return absl::OkStatus();
  RETURN_IF_ERROR(Run({Install()->Bin("pg_ctl"), "stop", "-D", data_dir(), "-m", "fast", "-w", "-t",
                       kPgCtlTimeoutSeconds, "-s"},
                      &Install()->user)
                      .status());
  running_ = false;
  return absl::OkStatus();
}

absl::Status PgCluster::StartAgain() {
  if (running_) return absl::OkStatus();
  return StartServer();
}

absl::StatusOr<std::unique_ptr<PgClusterSet>> PgClusterSet::Start(
    std::vector<std::string> region_names) {
  std::vector<std::string> names = {"control"};
  names.insert(names.end(), region_names.begin(), region_names.end());
  std::vector<absl::StatusOr<std::unique_ptr<PgCluster>>> results(names.size());
  {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < names.size(); ++i) {
      threads.emplace_back([&names, &results, i] { results[i] = PgCluster::Start(names[i]); });
    }
    for (std::thread& thread : threads) thread.join();
  }
  // Not make_unique: the constructor is private.
  std::unique_ptr<PgClusterSet> set(new PgClusterSet());
  for (size_t i = 0; i < results.size(); ++i) {
    if (!results[i].ok()) return results[i].status();  // Started ones stop as `results` goes.
    if (i == 0) {
      set->control_ = *std::move(results[i]);
    } else {
      set->regions_.push_back(*std::move(results[i]));
    }
  }
  return set;
}

PgClusterSet::~PgClusterSet() {
  std::vector<std::thread> threads;
  threads.emplace_back([this] { control_.reset(); });
  for (std::unique_ptr<PgCluster>& region : regions_) {
    threads.emplace_back([&region] { region.reset(); });
  }
  for (std::thread& thread : threads) thread.join();
}

PgCluster& PgClusterSet::region(absl::string_view name) const {
  for (const std::unique_ptr<PgCluster>& region : regions_) {
    if (region->name() == name) return *region;
  }
  std::fprintf(stderr, "PgClusterSet: no region named '%.*s'\n", static_cast<int>(name.size()),
               name.data());
  std::abort();
}

std::vector<PgCluster*> PgClusterSet::regions() const {
  std::vector<PgCluster*> regions;
  for (const std::unique_ptr<PgCluster>& region : regions_) regions.push_back(region.get());
  return regions;
}

}  // namespace medgate::test_support
